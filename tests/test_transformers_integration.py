"""flood_kernels.integrations.transformers on tiny randomly initialized models built from a config (no downloads)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flood_kernels.integrations.transformers import (  # noqa: E402
    flooded_causal_lm_loss,
    flooded_loss_for_trainer,
    patch_causal_lm_forward,
    patch_causal_lm_loss,
)
from helpers import requires_cuda, run_without_host_sync  # noqa: E402

try:
    from flood_kernels.linear import linear_flooded_cross_entropy  # noqa: F401
    HAS_LINEAR = True
except ImportError:  # the fused linear variant is not in this build
    HAS_LINEAR = False
requires_linear = pytest.mark.skipif(not HAS_LINEAR, reason="flood_kernels.linear not available")
VOCAB = 61


def tiny_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                                          max_position_embeddings=64, bos_token_id=0, eos_token_id=0)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"
    return model.train()  # train mode (dropout is 0): the fused forward returns no logits there


def batch():
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    labels = input_ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, 7:] = -100  # right padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, inputs, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs, **kwargs).loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_grads(actual, expected, sign=1.0):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], sign * expected[name], rtol=1e-4, atol=1e-6, msg=name)


def model_patchers():
    cases = [pytest.param(patch_causal_lm_loss, id="loss_function")]
    cases.append(pytest.param(patch_causal_lm_forward, id="fused_linear_forward", marks=requires_linear))
    return cases


@pytest.mark.parametrize("patch", model_patchers())
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("num_items", [None, 40])
def test_patched_model_matches_own_loss(patch, kind, num_items):
    model, inputs = tiny_model(kind), batch()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    expected_loss, expected_grads = loss_and_grads(model, inputs, **kwargs)
    for flood in (None, "batch", "individual"):
        with patch(model, flood_level=0.0, flood=flood):
            loss, grads = loss_and_grads(model, inputs, **kwargs)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        assert_grads(grads, expected_grads)
    # the patch is removed on exit
    assert torch.equal(loss_and_grads(model, inputs, **kwargs)[0], expected_loss)


@pytest.mark.parametrize("patch", model_patchers())
@pytest.mark.parametrize("num_items", [None, 40])
def test_patched_model_floods(patch, num_items):
    model, inputs = tiny_model("llama"), batch()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    raw, raw_grads = loss_and_grads(model, inputs, **kwargs)
    tokens = int((inputs["labels"][:, 1:] != -100).sum())
    share = 1.0 if num_items is None else tokens / num_items
    per_token = raw / share  # the micro-batch mean J in nats per token
    b = float(per_token) + 1.0  # above the loss: gradient ascent, the loss becomes 2b - J (times the share)
    with patch(model, flood_level=b, flood="batch"):
        loss, grads = loss_and_grads(model, inputs, **kwargs)
    torch.testing.assert_close(loss, share * (2 * b - per_token), rtol=1e-5, atol=1e-6)
    assert_grads(grads, raw_grads, sign=-1.0)
    b = float(per_token) - 1.0  # below the loss: plain descent
    with patch(model, flood_level=b, flood="batch"):
        loss, grads = loss_and_grads(model, inputs, **kwargs)
    torch.testing.assert_close(loss, raw, rtol=1e-5, atol=1e-6)
    assert_grads(grads, raw_grads)


def test_flooded_loss_matches_for_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 9, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels[1, 6:] = -100
    for num_items in (None, 30, torch.tensor(30)):
        expected = ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=num_items)
        actual = flooded_causal_lm_loss(logits, labels, VOCAB, num_items_in_batch=num_items, flood=None)
        torch.testing.assert_close(actual, expected)
    shift = torch.roll(labels, -1, dims=1)
    torch.testing.assert_close(flooded_causal_lm_loss(logits, labels, shift_labels=shift, flood=None),
                               ForCausalLMLoss(logits, labels, VOCAB, shift_labels=shift))


def test_flood_level_number_or_tensor():
    """A number and a 0-d tensor level give the same loss; a negative or non-finite number names the argument."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 9, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels[0, :3] = -100
    for num_items in (None, 30):
        as_number = flooded_causal_lm_loss(logits, labels, num_items_in_batch=num_items, flood_level=4.5)
        as_tensor = flooded_causal_lm_loss(logits, labels, num_items_in_batch=num_items,
                                           flood_level=torch.tensor(4.5, dtype=torch.float64))
        torch.testing.assert_close(as_number, as_tensor)
        for bad in (-0.1, float("nan")):
            with pytest.raises(ValueError, match="flood_level"):
                flooded_causal_lm_loss(logits, labels, num_items_in_batch=num_items, flood_level=bad)


@requires_cuda
@pytest.mark.gpu
def test_trainer_loss_does_not_synchronize():
    """A Python flood level and the Trainer's device-side token count: no host synchronization in a step."""
    g = torch.Generator(device="cuda").manual_seed(4)
    logits = torch.randn(2, 33, 1000, device="cuda", generator=g, requires_grad=True)
    labels = torch.randint(0, 1000, (2, 33), device="cuda", generator=g)
    num_items = (labels[:, 1:] != -100).sum()
    loss_fn = flooded_loss_for_trainer(flood_level=0.5)

    def step():
        loss_fn({"logits": logits}, labels, num_items_in_batch=num_items).backward()

    run_without_host_sync(step)


def test_trainer_compute_loss_func():
    model, inputs = tiny_model("gpt2"), batch()
    labels = inputs.pop("labels")
    outputs = model(**inputs)
    expected = model.loss_function(outputs.logits, labels, vocab_size=VOCAB, num_items_in_batch=torch.tensor(50))
    plain = flooded_loss_for_trainer(flood_level=0.0, flood=None)
    torch.testing.assert_close(plain(outputs, labels, num_items_in_batch=torch.tensor(50)), expected)
    torch.testing.assert_close(plain(outputs, labels), model.loss_function(outputs.logits, labels, vocab_size=VOCAB))
    # b above the loss with the Trainer's normalization: (n/N) * (2b - J), gradient reversed
    n = int((labels[:, 1:] != -100).sum())
    j = float(model.loss_function(outputs.logits.detach(), labels, vocab_size=VOCAB))
    flooded = flooded_loss_for_trainer(flood_level=j + 0.5)(outputs, labels, num_items_in_batch=50)
    torch.testing.assert_close(flooded, torch.tensor(n / 50 * (2 * (j + 0.5) - j)), rtol=1e-5, atol=1e-6)
    (g_flooded,) = torch.autograd.grad(flooded, outputs.logits, retain_graph=True)
    (g_plain,) = torch.autograd.grad(expected, outputs.logits)
    torch.testing.assert_close(g_flooded, -g_plain)
    # non-causal use: labels taken as they are
    logits = torch.randn(4, 5, 3)
    tags = torch.tensor([[0, 1, 2, -100, 1]] * 4)
    out = flooded_loss_for_trainer(flood=None, causal=False)({"logits": logits}, tags)
    torch.testing.assert_close(out, torch.nn.functional.cross_entropy(logits.reshape(-1, 3), tags.reshape(-1)))


def test_trainer_end_to_end(tmp_path):
    """A few Trainer steps with gradient accumulation: compute_loss_func gets num_items_in_batch and trains."""
    pytest.importorskip("accelerate")  # Trainer needs it (transformers[torch])
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, VOCAB, (8, 12), generator=g)]
    seen = []
    loss_func = flooded_loss_for_trainer(flood_level=0.1)

    def recording(outputs, labels, num_items_in_batch=None):
        seen.append(num_items_in_batch)
        return loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3,
                                          report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, compute_loss_func=recording)
    result = trainer.train()
    assert len(seen) == 4 and all(int(n) == 2 * 2 * 11 for n in seen)
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_patch_restores_previous_loss_function():
    model = tiny_model("llama")
    custom = lambda **kw: torch.tensor(0.0)  # noqa: E731
    model.loss_function = custom
    patch_causal_lm_loss(model, flood_level=0.1).remove()
    assert model.loss_function is custom


@requires_linear
def test_fused_forward_eval_and_generation_outputs():
    model, inputs = tiny_model("llama").eval(), batch()
    expected = model(**inputs)
    with patch_causal_lm_forward(model, flood=None):
        actual = model(**inputs)
        torch.testing.assert_close(actual.logits, expected.logits)
        torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-6)
        no_labels = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=1)
        assert no_labels.loss is None
        torch.testing.assert_close(no_labels.logits, expected.logits[:, -1:])
        model.train()
        assert model(**inputs).logits is None  # training: the logits are never materialized
    assert "forward" not in vars(model)
