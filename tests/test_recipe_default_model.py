"""The default-model recipe's own pieces: the loop unlikelihood targets (chat_trunk.loop_tokens)
and its loss (trunk.train_step), and the held-out split of the tool-episode language (no
training phrasing, verb or noun is one the evaluation holds out)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "default_model"
sys.path.insert(0, str(RECIPE))

import chat_trunk  # noqa: E402
import chats  # noqa: E402


def test_loop_tokens_mark_a_repeated_bigrams_other_continuation():
    #           0  1  2  3  4  5  6  7  8  9  10
    row = np.array([1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 9])
    got = chat_trunk.loop_tokens(row, np.ones(10, dtype=bool))
    # target 5 (after "1 2" again): a loop would say 3, the text says 5; target 8: the last
    # continuation of "1 2" was 5, the text says 3; target 9: "2 3" was followed by 4, now 9
    assert got.tolist() == [-1, -1, -1, -1, -1, 3, -1, -1, 5, 4]


def test_loop_tokens_ignore_a_repeat_the_text_makes_and_restart_with_the_region():
    row = np.array([7, 8, 9, 7, 8, 9, 7, 8, 1])
    assert chat_trunk.loop_tokens(row, np.ones(8, dtype=bool)).tolist() == [-1] * 7 + [9]
    # the earlier "7 8" lies outside the region (a prompt): nothing to repeat from
    region = np.array([False, False, False, True, True, True, True, True])
    assert chat_trunk.loop_tokens(row, region).tolist() == [-1] * 7 + [9]
    region = np.array([True, True, True, True, True, False, True, True])
    assert chat_trunk.loop_tokens(row, region).tolist() == [-1] * 8


def test_held_out_tool_language_is_never_trained_on():
    assert not set(chats.ARG_PHRASES) & set(chats.HELD_OUT_ARG_PHRASES)
    for v in (True, False):
        assert not set(chats.BOOL_PHRASES[v]) & set(chats.HELD_OUT_BOOL_PHRASES[v])
    assert not set(chats.REQUESTS) & set(chats.HELD_OUT_REQUESTS)
    assert not set(chats.VERBS) & set(chats.HELD_OUT_VERBS)
    assert not set(chats.NOUNS) & set(chats.HELD_OUT_NOUNS)
    # every held-out phrasing's words around the value are unseen as a whole in training
    for held in chats.HELD_OUT_ARG_PHRASES:
        assert all(held.replace("{v}", "").replace("{p}", "").strip() != t.replace("{v}", "").replace("{p}", "").strip()
                   for t in chats.ARG_PHRASES)


def test_unlikelihood_lowers_the_loop_tokens_probability():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import trunk

    small = {"hidden_size": 32, "num_hidden_layers": 2, "full_attention_interval": 2, "num_attention_heads": 2,
             "head_dim": 16, "linear_num_key_heads": 1, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
             "linear_value_head_dim": 16, "num_experts": 4, "moe_intermediate_size": 16,
             "shared_expert_intermediate_size": 16, "vocab_size": 64}
    # half the targets are token 5, so cross-entropy alone raises its probability everywhere;
    # at the other targets 5 is the loop token, which the unlikelihood term pushes back down
    x = torch.randint(6, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    x[:, 1::2] = 5
    loops = torch.full((2, 16), -1, dtype=torch.long)
    loops[:, 1::2] = 5

    def p_loop(model):
        with torch.no_grad():
            p = torch.softmax(model(input_ids=x[:, :-1]).logits.float(), -1)[..., 5]
        return float(p[loops >= 0].mean())

    ps = {}
    for weight in (0.0, 20.0):
        model = trunk.make_model(1, small)
        opt = trunk.make_opt(model, 1e-2)
        for _ in range(8):
            trunk.train_step(model, opt, x, 1e-2, None, loops, weight)
        ps[weight] = p_loop(model)
    assert ps[20.0] < 0.5 * ps[0.0], ps
