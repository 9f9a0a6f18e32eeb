"""The search command line end to end on a train.py run: embed a file and a folder, query,
JSON output, and its errors."""
import json

import numpy as np
import pytest

from transformer_jax.search import SentenceEncoder, VectorIndex, cli

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

from test_search_encoder import tiny_mlm_run  # noqa: E402


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    return tiny_mlm_run(tmp_path_factory)


def test_embed_file_then_search_json_and_text(mlm_run, tmp_path, capsys):
    docs = tmp_path / "docs.txt"
    docs.write_text("the cat sat\n\na dog ran\nit sat on a mat\nthe dog\n")
    index_path = tmp_path / "docs.index"
    assert cli.main(["embed", str(docs), "--model", mlm_run, "--index", str(index_path)]) == 0
    index = VectorIndex.load(index_path)
    assert index.ids == [1, 3, 4, 5] and index.texts[0] == "the cat sat" and index.metric == "cosine"
    capsys.readouterr()
    assert cli.main(["search", "--index", str(index_path), "-k", "2", "--json", "a dog", "the cat"]) == 0
    results = json.loads(capsys.readouterr().out)
    # reference: the same encoder and a float64 brute-force cosine ranking
    encoder = SentenceEncoder.load(mlm_run)
    corpus = encoder.encode(index.texts).astype(np.float64)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    for query in ("a dog", "the cat"):
        q = encoder.encode([query])[0].astype(np.float64)
        scores = corpus @ (q / np.linalg.norm(q))
        best = np.argsort(-scores, kind="stable")[:2]
        assert [r["id"] for r in results[query]] == [index.ids[b] for b in best]
        assert [r["text"] for r in results[query]] == [index.texts[b] for b in best]
        np.testing.assert_allclose([r["score"] for r in results[query]], scores[best], atol=1e-5)
    assert cli.main(["search", "--index", str(index_path), "-k", "1", "a dog"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "query: a dog" and out[1].split()[0] == "1." and len(out) == 2
    assert cli.main(["embed", str(docs), "--model", mlm_run, "--index", str(index_path), "--append"]) == 1
    assert "already in the index" in capsys.readouterr().err


def test_embed_folder_and_errors(mlm_run, tmp_path, capsys):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("the cat sat on a mat")
    (folder / "sub" / "b.txt").write_text("a dog ran")
    (folder / "skip.bin").write_bytes(b"\xff\xfe")
    index_path = tmp_path / "f.index"
    import train  # the same commands mounted as `train.py embed` / `train.py search`

    assert train.main(["embed", str(folder), "--pattern", "*.txt", "--model", mlm_run,
                       "--index", str(index_path)]) == 0
    assert VectorIndex.load(index_path).ids == ["a.txt", "sub/b.txt"]
    capsys.readouterr()
    assert train.main(["search", "--index", str(index_path), "-k", "2", "--json", "a dog"]) == 0
    via_train = json.loads(capsys.readouterr().out)
    assert cli.main(["search", "--index", str(index_path), "-k", "2", "--json", "a dog"]) == 0
    assert via_train == json.loads(capsys.readouterr().out) and len(via_train["a dog"]) == 2
    capsys.readouterr()
    assert cli.main(["search", "--index", str(index_path), "-k", "3", "cat"]) == 1
    assert "k=3 is larger than the corpus (2 rows)" in capsys.readouterr().err
    assert cli.main(["search", "--index", str(index_path), " "]) == 1
    assert "query is empty" in capsys.readouterr().err
    assert cli.main(["embed", str(folder), "--model", mlm_run, "--index", str(index_path)]) == 1
    assert "not UTF-8" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n \n")
    assert cli.main(["embed", str(tmp_path / "blank.txt"), "--model", mlm_run, "--index", str(index_path)]) == 1
    assert "holds no documents" in capsys.readouterr().err
    assert VectorIndex.load(index_path).ids == ["a.txt", "sub/b.txt"]  # failed runs left it intact
