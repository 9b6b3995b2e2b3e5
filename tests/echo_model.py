"""The echo chat model of the inference / serving / evaluation tests: its answer depends on the prompt.

A tiny Llama (hidden 32) with hand-set weights. Each keyword of ``KEYWORDS`` is one token (" fever",
" cough", ...); the model answers "A <keyword>" naming the keyword that occurs most often in the
whole conversation, then ends its turn. ``LOOP`` (" pain") never ends: "A pain pain pain ..." runs
to max_new_tokens, the long generation of the cancellation tests. So a batch answered in the wrong
row order, a prompt cut or padded on the wrong side, a history that was dropped, or a pad token
that leaks into attention all change the answers.

How (hidden dims; attention and MLP of layer 2 and the MLP of layer 1 add nothing):

- dims 0-4 say what the current token is: 0 any other token (pad included), 1 "\\n" (the end of the
  assistant header), 2 "A", 3 a keyword, 4 the loop keyword;
- dims 8-15 (the keyword's "source" feature) are set in the embeddings of the keywords;
- layer 1 attends uniformly (q = k = 0) over the unmasked positions and copies dims 8-15 into dims
  16-23: the keyword counts of the sequence, over its length;
- lm_head: after "\\n" -> "A"; after "A"
  -> the keyword with the largest count; after a keyword -> <|im_end|>; after the loop keyword -> the
  loop keyword; after anything else -> <|im_end|>. The state margin (G) beats any count term (S).
- <|pad|> carries a large count of " virus": if padding were attended, padded rows would answer
  "A virus".
"""
from __future__ import annotations

import re

import torch

KEYWORDS = ["fever", "cough", "headache", "virus", "kidney", "lung", "blood", "pain"]
LOOP = "pain"
LEAK = "virus"  # what a pad token that is attended to votes for
G, S = 100.0, 25.0  # state margin, count scale (S * counts stays under G; see the module doc)


def expected_answer(conversation: str) -> str:
    """The echo model's answer to a conversation (all its message texts joined): "A <keyword>" for
    the keyword (a whole word after a space) that occurs most often; ties go to the first in
    KEYWORDS. Not defined for LOOP (it never ends) or for text without a keyword."""
    counts = {k: len(re.findall(rf"(?<= ){k}\b", conversation)) for k in KEYWORDS}
    best = max(KEYWORDS, key=lambda k: counts[k])
    assert counts[best] > 0 and best != LOOP, conversation
    return f"A {best}"


def echo_lm(tok, make_llama, max_position_embeddings: int = 4096):
    """The echo model for tokenizer ``tok`` (the tiny BPE of conftest with the ChatML template)."""
    model = make_llama(len(tok), max_position_embeddings=max_position_embeddings)
    ids = {k: tok.convert_tokens_to_ids("Ġ" + k) for k in KEYWORDS}
    newline, a_tok = tok.convert_tokens_to_ids("Ċ"), tok.convert_tokens_to_ids("A")
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    assert all(i != tok.unk_token_id and i is not None for i in [*ids.values(), newline, a_tok, end, pad])
    with torch.no_grad():
        for layer in model.model.layers:
            for w in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                      layer.self_attn.o_proj, layer.mlp.down_proj):
                w.weight.zero_()
        attn = model.model.layers[0].self_attn
        for c in range(len(KEYWORDS)):
            attn.v_proj.weight[c, 8 + c] = 1.0  # kv head 0, channel c <- source feature c
            attn.o_proj.weight[16 + c, c] = 1.0  # count c <- query head 0 (reads kv head 0), channel c
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1.0
        for tid, state in ((newline, 1), (a_tok, 2)):
            emb[tid, 0], emb[tid, state] = 0.0, 1.0
        for c, k in enumerate(KEYWORDS):
            emb[ids[k], 0] = 0.0
            emb[ids[k], 4 if k == LOOP else 3] = 1.0
            emb[ids[k], 8 + c] = 1.0
        emb[pad, 8 + KEYWORDS.index(LEAK)] = 8.0
        head.zero_()
        head[a_tok, 1] = G
        for c, k in enumerate(KEYWORDS):
            head[ids[k], 2] = G
            head[ids[k], 16 + c] = S
        head[end, 0] = head[end, 3] = G
        head[ids[LOOP], 4] = G
    return model
