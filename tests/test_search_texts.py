"""The shared `encode(texts, batch_size)` argument check."""
import pytest

from transformer_jax.search.texts import checked_texts


def test_a_list_or_any_iterable_of_str_comes_back_as_a_list():
    assert checked_texts(("a", "b c"), 2) == ["a", "b c"]
    assert checked_texts((t for t in ["x"]), 1) == ["x"]


@pytest.mark.parametrize("texts, batch_size, error, words", [
    ("one text", 1, TypeError, "not one str"),
    ([], 1, ValueError, "texts is empty"),
    (["a", 3], 1, TypeError, "texts[1] is a int"),
    (["a"], 0, ValueError, "batch_size=0"),
    (["a"], True, ValueError, "batch_size=True"),
    (["a"], 2.0, ValueError, "batch_size=2.0"),
])
def test_bad_arguments_are_named(texts, batch_size, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        checked_texts(texts, batch_size)
