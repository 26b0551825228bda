"""The Hugging Face side of each family, written out literally: key tables and config.json fields.

A key table maps HF parameter names to ours, and drives loading and saving alike (mlm/hf.py applies
it). In an HF name `{i}` is the layer index and `{base}` the encoder's prefix ("bert.", "roberta.",
"distilbert.", "deberta."), which checkpoints of a bare encoder (BertModel, all-MiniLM-L6-v2) do not
have. A tuple of HF names is one of our tensors cut along dim 0: our fused QKV projection is HF's
query, key and value. `None` marks a key HF writes that our model has no use for; it is there so the
table names every key. DeBERTa names its MLM head in two ways; config.json's `legacy` says which one
the checkpoint uses.

Adding a family is a table here, its config fields, and its blocks in mlm/model/.
"""

BERT_KEYS = {
    "{base}embeddings.word_embeddings.weight": "encoder.embeddings.word.weight",
    "{base}embeddings.position_embeddings.weight": "encoder.embeddings.position.weight",
    "{base}embeddings.token_type_embeddings.weight": "encoder.embeddings.token_type.weight",
    "{base}embeddings.LayerNorm.weight": "encoder.embeddings.norm.weight",
    "{base}embeddings.LayerNorm.bias": "encoder.embeddings.norm.bias",
    "{base}embeddings.position_ids": None,  # buffers that older transformers versions saved
    "{base}embeddings.token_type_ids": None,
    (
        "{base}encoder.layer.{i}.attention.self.query.weight",
        "{base}encoder.layer.{i}.attention.self.key.weight",
        "{base}encoder.layer.{i}.attention.self.value.weight",
    ): "encoder.blocks.{i}.attn.qkv.weight",
    (
        "{base}encoder.layer.{i}.attention.self.query.bias",
        "{base}encoder.layer.{i}.attention.self.key.bias",
        "{base}encoder.layer.{i}.attention.self.value.bias",
    ): "encoder.blocks.{i}.attn.qkv.bias",
    "{base}encoder.layer.{i}.attention.output.dense.weight": "encoder.blocks.{i}.attn.proj.weight",
    "{base}encoder.layer.{i}.attention.output.dense.bias": "encoder.blocks.{i}.attn.proj.bias",
    "{base}encoder.layer.{i}.attention.output.LayerNorm.weight": "encoder.blocks.{i}.attn_norm.weight",  # noqa: E501 (a table row)
    "{base}encoder.layer.{i}.attention.output.LayerNorm.bias": "encoder.blocks.{i}.attn_norm.bias",
    "{base}encoder.layer.{i}.intermediate.dense.weight": "encoder.blocks.{i}.fc1.weight",
    "{base}encoder.layer.{i}.intermediate.dense.bias": "encoder.blocks.{i}.fc1.bias",
    "{base}encoder.layer.{i}.output.dense.weight": "encoder.blocks.{i}.fc2.weight",
    "{base}encoder.layer.{i}.output.dense.bias": "encoder.blocks.{i}.fc2.bias",
    "{base}encoder.layer.{i}.output.LayerNorm.weight": "encoder.blocks.{i}.mlp_norm.weight",
    "{base}encoder.layer.{i}.output.LayerNorm.bias": "encoder.blocks.{i}.mlp_norm.bias",
    "{base}pooler.dense.weight": None,  # the [CLS] pooler, used by next-sentence and sentence tasks
    "{base}pooler.dense.bias": None,
    "cls.predictions.transform.dense.weight": "head.dense.weight",
    "cls.predictions.transform.dense.bias": "head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "head.norm.bias",
    "cls.predictions.bias": "head.decoder.bias",
    "cls.predictions.decoder.weight": None,  # tied to the word embeddings
    "cls.predictions.decoder.bias": None,  # the same tensor as cls.predictions.bias
    "cls.seq_relationship.weight": None,  # BertForPreTraining's next-sentence head
    "cls.seq_relationship.bias": None,
}

ROBERTA_KEYS = {
    "{base}embeddings.word_embeddings.weight": "encoder.embeddings.word.weight",
    "{base}embeddings.position_embeddings.weight": "encoder.embeddings.position.weight",
    "{base}embeddings.token_type_embeddings.weight": "encoder.embeddings.token_type.weight",
    "{base}embeddings.LayerNorm.weight": "encoder.embeddings.norm.weight",
    "{base}embeddings.LayerNorm.bias": "encoder.embeddings.norm.bias",
    "{base}embeddings.position_ids": None,  # buffers that older transformers versions saved
    "{base}embeddings.token_type_ids": None,
    (
        "{base}encoder.layer.{i}.attention.self.query.weight",
        "{base}encoder.layer.{i}.attention.self.key.weight",
        "{base}encoder.layer.{i}.attention.self.value.weight",
    ): "encoder.blocks.{i}.attn.qkv.weight",
    (
        "{base}encoder.layer.{i}.attention.self.query.bias",
        "{base}encoder.layer.{i}.attention.self.key.bias",
        "{base}encoder.layer.{i}.attention.self.value.bias",
    ): "encoder.blocks.{i}.attn.qkv.bias",
    "{base}encoder.layer.{i}.attention.output.dense.weight": "encoder.blocks.{i}.attn.proj.weight",
    "{base}encoder.layer.{i}.attention.output.dense.bias": "encoder.blocks.{i}.attn.proj.bias",
    "{base}encoder.layer.{i}.attention.output.LayerNorm.weight": "encoder.blocks.{i}.attn_norm.weight",  # noqa: E501 (a table row)
    "{base}encoder.layer.{i}.attention.output.LayerNorm.bias": "encoder.blocks.{i}.attn_norm.bias",
    "{base}encoder.layer.{i}.intermediate.dense.weight": "encoder.blocks.{i}.fc1.weight",
    "{base}encoder.layer.{i}.intermediate.dense.bias": "encoder.blocks.{i}.fc1.bias",
    "{base}encoder.layer.{i}.output.dense.weight": "encoder.blocks.{i}.fc2.weight",
    "{base}encoder.layer.{i}.output.dense.bias": "encoder.blocks.{i}.fc2.bias",
    "{base}encoder.layer.{i}.output.LayerNorm.weight": "encoder.blocks.{i}.mlp_norm.weight",
    "{base}encoder.layer.{i}.output.LayerNorm.bias": "encoder.blocks.{i}.mlp_norm.bias",
    "{base}pooler.dense.weight": None,  # RobertaModel's [CLS] pooler
    "{base}pooler.dense.bias": None,
    "lm_head.dense.weight": "head.dense.weight",
    "lm_head.dense.bias": "head.dense.bias",
    "lm_head.layer_norm.weight": "head.norm.weight",
    "lm_head.layer_norm.bias": "head.norm.bias",
    "lm_head.bias": "head.decoder.bias",
    "lm_head.decoder.weight": None,  # tied to the word embeddings
    "lm_head.decoder.bias": None,  # the same tensor as lm_head.bias
}

DISTILBERT_KEYS = {
    "{base}embeddings.word_embeddings.weight": "encoder.embeddings.word.weight",
    "{base}embeddings.position_embeddings.weight": "encoder.embeddings.position.weight",
    "{base}embeddings.LayerNorm.weight": "encoder.embeddings.norm.weight",
    "{base}embeddings.LayerNorm.bias": "encoder.embeddings.norm.bias",
    "{base}embeddings.position_ids": None,  # a buffer that older transformers versions saved
    (
        "{base}transformer.layer.{i}.attention.q_lin.weight",
        "{base}transformer.layer.{i}.attention.k_lin.weight",
        "{base}transformer.layer.{i}.attention.v_lin.weight",
    ): "encoder.blocks.{i}.attn.qkv.weight",
    (
        "{base}transformer.layer.{i}.attention.q_lin.bias",
        "{base}transformer.layer.{i}.attention.k_lin.bias",
        "{base}transformer.layer.{i}.attention.v_lin.bias",
    ): "encoder.blocks.{i}.attn.qkv.bias",
    "{base}transformer.layer.{i}.attention.out_lin.weight": "encoder.blocks.{i}.attn.proj.weight",
    "{base}transformer.layer.{i}.attention.out_lin.bias": "encoder.blocks.{i}.attn.proj.bias",
    "{base}transformer.layer.{i}.sa_layer_norm.weight": "encoder.blocks.{i}.attn_norm.weight",
    "{base}transformer.layer.{i}.sa_layer_norm.bias": "encoder.blocks.{i}.attn_norm.bias",
    "{base}transformer.layer.{i}.ffn.lin1.weight": "encoder.blocks.{i}.fc1.weight",
    "{base}transformer.layer.{i}.ffn.lin1.bias": "encoder.blocks.{i}.fc1.bias",
    "{base}transformer.layer.{i}.ffn.lin2.weight": "encoder.blocks.{i}.fc2.weight",
    "{base}transformer.layer.{i}.ffn.lin2.bias": "encoder.blocks.{i}.fc2.bias",
    "{base}transformer.layer.{i}.output_layer_norm.weight": "encoder.blocks.{i}.mlp_norm.weight",
    "{base}transformer.layer.{i}.output_layer_norm.bias": "encoder.blocks.{i}.mlp_norm.bias",
    "vocab_transform.weight": "head.dense.weight",
    "vocab_transform.bias": "head.dense.bias",
    "vocab_layer_norm.weight": "head.norm.weight",
    "vocab_layer_norm.bias": "head.norm.bias",
    "vocab_projector.bias": "head.decoder.bias",
    "vocab_projector.weight": None,  # tied to the word embeddings
}

DEBERTA_V2_KEYS = {
    "{base}embeddings.word_embeddings.weight": "encoder.embeddings.word.weight",
    # Read only with position_biased_input; v3 checkpoints carry an unused table, skipped as
    # transformers does.
    "{base}embeddings.position_embeddings.weight": "encoder.embeddings.position.weight",
    "{base}embeddings.token_type_embeddings.weight": "encoder.embeddings.token_type.weight",
    # only when embedding_size != hidden_size
    "{base}embeddings.embed_proj.weight": "encoder.embeddings.proj.weight",
    "{base}embeddings.LayerNorm.weight": "encoder.embeddings.norm.weight",
    "{base}embeddings.LayerNorm.bias": "encoder.embeddings.norm.bias",
    "{base}embeddings.position_ids": None,  # a buffer that older transformers versions saved
    (
        "{base}encoder.layer.{i}.attention.self.query_proj.weight",
        "{base}encoder.layer.{i}.attention.self.key_proj.weight",
        "{base}encoder.layer.{i}.attention.self.value_proj.weight",
    ): "encoder.blocks.{i}.attn.qkv.weight",
    (
        "{base}encoder.layer.{i}.attention.self.query_proj.bias",
        "{base}encoder.layer.{i}.attention.self.key_proj.bias",
        "{base}encoder.layer.{i}.attention.self.value_proj.bias",
    ): "encoder.blocks.{i}.attn.qkv.bias",
    # share_att_key=false (v2): positions have projections of their own, for c2p and for p2c.
    "{base}encoder.layer.{i}.attention.self.pos_key_proj.weight": "encoder.blocks.{i}.attn.pos_key.weight",  # noqa: E501 (a table row)
    "{base}encoder.layer.{i}.attention.self.pos_key_proj.bias": "encoder.blocks.{i}.attn.pos_key.bias",  # noqa: E501 (a table row)
    "{base}encoder.layer.{i}.attention.self.pos_query_proj.weight": "encoder.blocks.{i}.attn.pos_query.weight",  # noqa: E501 (a table row)
    "{base}encoder.layer.{i}.attention.self.pos_query_proj.bias": "encoder.blocks.{i}.attn.pos_query.bias",  # noqa: E501 (a table row)
    "{base}encoder.layer.{i}.attention.output.dense.weight": "encoder.blocks.{i}.attn.proj.weight",
    "{base}encoder.layer.{i}.attention.output.dense.bias": "encoder.blocks.{i}.attn.proj.bias",
    "{base}encoder.layer.{i}.attention.output.LayerNorm.weight": "encoder.blocks.{i}.attn_norm.weight",  # noqa: E501 (a table row)
    "{base}encoder.layer.{i}.attention.output.LayerNorm.bias": "encoder.blocks.{i}.attn_norm.bias",
    "{base}encoder.layer.{i}.intermediate.dense.weight": "encoder.blocks.{i}.fc1.weight",
    "{base}encoder.layer.{i}.intermediate.dense.bias": "encoder.blocks.{i}.fc1.bias",
    "{base}encoder.layer.{i}.output.dense.weight": "encoder.blocks.{i}.fc2.weight",
    "{base}encoder.layer.{i}.output.dense.bias": "encoder.blocks.{i}.fc2.bias",
    "{base}encoder.layer.{i}.output.LayerNorm.weight": "encoder.blocks.{i}.mlp_norm.weight",
    "{base}encoder.layer.{i}.output.LayerNorm.bias": "encoder.blocks.{i}.mlp_norm.bias",
    "{base}encoder.rel_embeddings.weight": "encoder.relative.table.weight",
    # norm_rel_ebd = "layer_norm": the table's norm
    "{base}encoder.LayerNorm.weight": "encoder.relative.norm.weight",
    "{base}encoder.LayerNorm.bias": "encoder.relative.norm.bias",
    # The MLM head under one of two names, which config.json's `legacy` picks (head_table): legacy
    # ...
    "cls.predictions.transform.dense.weight": "head.dense.weight",
    "cls.predictions.transform.dense.bias": "head.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "head.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "head.norm.bias",
    "cls.predictions.bias": "head.decoder.bias",
    "cls.predictions.decoder.weight": None,  # tied to the word embeddings
    "cls.predictions.decoder.bias": None,  # the same tensor as cls.predictions.bias
    # ... or not: the original DeBERTa code's names.
    "lm_predictions.lm_head.dense.weight": "head.dense.weight",
    "lm_predictions.lm_head.dense.bias": "head.dense.bias",
    "lm_predictions.lm_head.LayerNorm.weight": "head.norm.weight",
    "lm_predictions.lm_head.LayerNorm.bias": "head.norm.bias",
    "lm_predictions.lm_head.bias": "head.decoder.bias",
    # v3's replaced-token-detection (ELECTRA discriminator) head, which transformers does not load
    # either.
    "mask_predictions.dense.weight": None,
    "mask_predictions.dense.bias": None,
    "mask_predictions.LayerNorm.weight": None,
    "mask_predictions.LayerNorm.bias": None,
    "mask_predictions.classifier.weight": None,
    "mask_predictions.classifier.bias": None,
}
# by ModelConfig.legacy_head
DEBERTA_HEADS = {True: "cls.predictions.", False: "lm_predictions.lm_head."}

# Biases exist only where config.json switches them on (norm_bias, attention_bias, mlp_bias,
# classifier_bias, decoder_bias); layer 0 has no attn_norm. Keys our model lacks are skipped.
MODERNBERT_KEYS = {
    "{base}embeddings.tok_embeddings.weight": "encoder.embeddings.word.weight",
    "{base}embeddings.norm.weight": "encoder.embeddings.norm.weight",
    "{base}embeddings.norm.bias": "encoder.embeddings.norm.bias",
    "{base}layers.{i}.attn_norm.weight": "encoder.blocks.{i}.attn_norm.weight",
    "{base}layers.{i}.attn_norm.bias": "encoder.blocks.{i}.attn_norm.bias",
    "{base}layers.{i}.attn.Wqkv.weight": "encoder.blocks.{i}.attn.qkv.weight",
    "{base}layers.{i}.attn.Wqkv.bias": "encoder.blocks.{i}.attn.qkv.bias",
    "{base}layers.{i}.attn.Wo.weight": "encoder.blocks.{i}.attn.proj.weight",
    "{base}layers.{i}.attn.Wo.bias": "encoder.blocks.{i}.attn.proj.bias",
    "{base}layers.{i}.mlp_norm.weight": "encoder.blocks.{i}.mlp_norm.weight",
    "{base}layers.{i}.mlp_norm.bias": "encoder.blocks.{i}.mlp_norm.bias",
    "{base}layers.{i}.mlp.Wi.weight": "encoder.blocks.{i}.fc1.weight",
    "{base}layers.{i}.mlp.Wi.bias": "encoder.blocks.{i}.fc1.bias",
    "{base}layers.{i}.mlp.Wo.weight": "encoder.blocks.{i}.fc2.weight",
    "{base}layers.{i}.mlp.Wo.bias": "encoder.blocks.{i}.fc2.bias",
    "{base}final_norm.weight": "encoder.final_norm.weight",
    "{base}final_norm.bias": "encoder.final_norm.bias",
    # RoPE's frequencies: buffers, recomputed from config.json's thetas
    "{base}rotary_emb.full_attention_inv_freq": None,
    "{base}rotary_emb.full_attention_original_inv_freq": None,
    "{base}rotary_emb.sliding_attention_inv_freq": None,
    "{base}rotary_emb.sliding_attention_original_inv_freq": None,
    "head.dense.weight": "head.dense.weight",
    "head.dense.bias": "head.dense.bias",
    "head.norm.weight": "head.norm.weight",
    "head.norm.bias": "head.norm.bias",
    "decoder.weight": None,  # tied to the word embeddings
    "decoder.bias": "head.decoder.bias",
}

KEYS = {
    "bert": BERT_KEYS,
    "roberta": ROBERTA_KEYS,
    "distilbert": DISTILBERT_KEYS,
    "deberta-v2": DEBERTA_V2_KEYS,
    "modernbert": MODERNBERT_KEYS,
}
BASE = {
    "bert": "bert.",
    "roberta": "roberta.",
    "distilbert": "distilbert.",
    "deberta-v2": "deberta.",
    "modernbert": "model.",
}
ARCHITECTURE = {
    "bert": "BertForMaskedLM",
    "roberta": "RobertaForMaskedLM",
    "distilbert": "DistilBertForMaskedLM",
    "deberta-v2": "DebertaV2ForMaskedLM",
    "modernbert": "ModernBertForMaskedLM",
}

# HF config.json <-> ModelConfig. BERT and RoBERTa share field names; DistilBERT has its own.
_BERT_CONFIG = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "hidden_act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
    "pad_token_id": "pad_token_id",
    "hidden_dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob",
    "initializer_range": "initializer_range",
}
CONFIG_FIELDS = {
    "bert": _BERT_CONFIG,
    "roberta": _BERT_CONFIG,
    "deberta-v2": {
        **_BERT_CONFIG,
        "position_biased_input": "position_biased_input",
        "position_buckets": "position_buckets",
        "max_relative_positions": "max_relative_positions",
        "share_att_key": "share_att_key",
        "legacy_head": "legacy",
        # + embedding_size, pos_att_type (position_terms) and norm_rel_ebd, which change form
        # (config_from_hf)
    },
    "modernbert": {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "intermediate_size": "intermediate_size",
        "max_position_embeddings": "max_position_embeddings",
        "hidden_act": "hidden_activation",
        "head_act": "classifier_activation",
        "layer_norm_eps": "norm_eps",
        "pad_token_id": "pad_token_id",
        "cls_token_id": "cls_token_id",
        "sep_token_id": "sep_token_id",
        "hidden_dropout": "mlp_dropout",
        "attention_dropout": "attention_dropout",
        "embedding_dropout": "embedding_dropout",
        "initializer_range": "initializer_range",
        "initializer_cutoff_factor": "initializer_cutoff_factor",
        "local_attention": "local_attention",
        "norm_bias": "norm_bias",
        "attention_bias": "attention_bias",
        "mlp_bias": "mlp_bias",
        "classifier_bias": "classifier_bias",
        "decoder_bias": "decoder_bias",
        # + layer_types and the rope thetas, in either of two forms (config_from_hf)
    },
    "distilbert": {
        "vocab_size": "vocab_size",
        "hidden_size": "dim",
        "num_layers": "n_layers",
        "num_heads": "n_heads",
        "intermediate_size": "hidden_dim",
        "max_position_embeddings": "max_position_embeddings",
        "hidden_act": "activation",
        "pad_token_id": "pad_token_id",
        "hidden_dropout": "dropout",
        "attention_dropout": "attention_dropout",
        "initializer_range": "initializer_range",
    },
}
# What transformers assumes when a DeBERTa config.json leaves a field out (DebertaV2Config and
# getattr defaults).
DEBERTA_DEFAULTS = {
    "type_vocab_size": 0,
    "layer_norm_eps": 1e-7,
    "relative_attention": False,
    "position_biased_input": True,
    "pos_att_type": None,
    "position_buckets": -1,
    "max_relative_positions": -1,
    "share_att_key": False,
    "norm_rel_ebd": "none",
    "legacy": True,
    "conv_kernel_size": 0,
}

# What transformers' ModernBertConfig assumes for a field config.json leaves out.
MODERNBERT_DEFAULTS = {
    "vocab_size": 50368,
    "hidden_size": 768,
    "num_hidden_layers": 22,
    "num_attention_heads": 12,
    "intermediate_size": 1152,
    "max_position_embeddings": 8192,
    "hidden_activation": "gelu",
    "classifier_activation": "gelu",
    "norm_eps": 1e-5,
    "pad_token_id": 50283,
    "cls_token_id": 50281,
    "sep_token_id": 50282,
    "mlp_dropout": 0.0,
    "attention_dropout": 0.0,
    "embedding_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_cutoff_factor": 2.0,
    "local_attention": 128,
    "norm_bias": False,
    "attention_bias": False,
    "mlp_bias": False,
    "classifier_bias": False,
    "decoder_bias": True,
    "global_attn_every_n_layers": 3,
    "global_rope_theta": 160000.0,
    "local_rope_theta": 10000.0,
}
# transformers 5's names of the two kinds of layer, in layer_types and rope_parameters.
LAYER_TYPES = {"global": "full_attention", "local": "sliding_attention"}
