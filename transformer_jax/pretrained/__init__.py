"""Pretrained models: load and save the Hugging Face format.

    pre = from_pretrained(directory)         # Pretrained(model, params, tokenizer, config, pooling, hf_config)
    logits = pre.model.apply({"params": pre.params}, tokens)
    save_pretrained(out_dir, pre.model, pre.params, pre.tokenizer)   # transformers loads out_dir

Supported `model_type`s: gpt2 (-> DecoderLM), bert (BertModel or a sentence-transformers
directory -> Encoder, BertForMaskedLM -> MaskedLM, BertForSequenceClassification ->
SequenceClassifier with pooling "first" and the pooler), llama, mistral, qwen2
(-> DecoderLM), marian (-> EncoderDecoder). Anything else, or a config option the package lacks (rope
scaling, relative positions, ...), is a ValueError naming it.

The interface a sentence encoder builds on (kept stable):
  - `Pretrained(model, params, tokenizer, config, pooling, hf_config)`: for a
    sentence-transformers directory `model` is an `Encoder` (hidden states [b, t, d]) and
    `pooling` a `Pooling(mode, normalize)`; `pooling(hidden, padding_mask)` gives the
    float32 sentence embeddings [b, d] sentence-transformers gives.
  - `tokenizer.encode_batch(texts) -> list of int32 id arrays`, with the model's special
    tokens added as Hugging Face adds them ([CLS] ... [SEP] for BERT), each truncated to
    `tokenizer.max_length`; `tokenizer.pad_id` pads them (right padding, with
    `padding_mask = ids != pad` built from the lengths, not the ids).
  - `minilm_path()`: the directory of all-MiniLM-L6-v2, downloaded once.

Positions under padding: our Encoder numbers real tokens only (padding never shifts a
position) and DecoderLM/generation take right-padded prompts, so padding never shifts
positions either; Hugging Face counts left padding unless `position_ids` are given. The
two agree on right-padded (or unpadded) inputs, which the parity tests use.

Modules: safetensors_io (the format, streamed), common (table entries, transforms),
gpt2 / bert / llama / marian (one family each: config both ways, key table), tokenizer
(tokenizer.json wrapper), sentence (sentence-transformers pooling), loader
(from_pretrained, save_pretrained), minilm (the cached real model).
"""
from transformer_jax.pretrained.loader import Pretrained, from_pretrained, save_pretrained
from transformer_jax.pretrained.minilm import minilm_path
from transformer_jax.pretrained.sentence import Pooling
from transformer_jax.pretrained.tokenizer import HFTokenizer

__all__ = ["HFTokenizer", "Pooling", "Pretrained", "from_pretrained", "minilm_path", "save_pretrained"]
