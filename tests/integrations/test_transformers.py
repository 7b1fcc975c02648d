"""gradkit under the Hugging Face Trainer: MeZO fine-tuning of a tiny random GPT-2, resume, accumulation, SF."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (extra gradkit[transformers])")
pytest.importorskip("accelerate", reason="accelerate (the Trainer's backend) is not installed")

import gradkit as gk  # noqa: E402
from gradkit.integrations.transformers import STAGES_FILE, GradkitTrainerCallback, ZOTrainer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SEQ = 12


def tiny_gpt2(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=48, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


def dataset(n=32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 48, (n, SEQ), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def targs(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2,
                lr_scheduler_type="constant", weight_decay=0.0, save_strategy="no", logging_strategy="no",
                report_to="none", disable_tqdm=True, use_cpu=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_mezo_finetune_resumes_bit_identically(tmp_path):
    straight = tiny_gpt2()
    start = flat(straight).clone()
    ZOTrainer(model=straight, args=targs(tmp_path / "a"), train_dataset=dataset(), zo_directions=2).train()
    assert not torch.equal(flat(straight), start)

    first = tiny_gpt2()
    ZOTrainer(model=first, args=targs(tmp_path / "b", save_strategy="steps", save_steps=4),
              train_dataset=dataset(), zo_directions=2).train()
    ckpt = tmp_path / "b" / "checkpoint-4"
    zo_state = torch.load(ckpt / "optimizer.pt", weights_only=True)["zo"]
    assert zo_state["step"] == 4  # the source's step (its directions' seed) is in the Trainer's checkpoint

    resumed = tiny_gpt2()
    trainer = ZOTrainer(model=resumed, args=targs(tmp_path / "b", save_strategy="steps", save_steps=4),
                        train_dataset=dataset(), zo_directions=2)
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert trainer.state.global_step == 8 and trainer.optimizer.optimizer.step_count == 8
    assert torch.equal(flat(resumed), flat(straight))


def test_losses_are_evaluated_in_eval_mode_unless_dropout_is_asked_for(tmp_path):
    for dropout in (False, True):
        model = tiny_gpt2()
        modes = []
        model.register_forward_pre_hook(lambda m, a: modes.append(m.training))
        trainer = ZOTrainer(model=model, args=targs(tmp_path, max_steps=2), train_dataset=dataset(),
                            zo_dropout=dropout)
        trainer.train()
        assert len(modes) == 2 * 2  # 2 steps x 2 evaluations (K = 1), no other forward
        assert set(modes) == {dropout}


def test_default_optimizer_has_no_decay_on_bias_and_layernorm(tmp_path):
    model = tiny_gpt2()
    trainer = ZOTrainer(model=model, args=targs(tmp_path, weight_decay=0.1), train_dataset=dataset())
    opt = trainer.create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, plain = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all("bias" not in n and ".ln_" not in n and "ln_f" not in n for n in decayed)
    assert any(".ln_1.weight" in n for n in plain) and any(n.endswith(".bias") for n in plain)
    assert len(decayed) + len(plain) == len(list(model.parameters()))
    # One step with a tiny eps and a huge decay: the no-decay group moves by the ZO term only.
    with torch.no_grad():
        ln = model.transformer.ln_f.weight
        ln_before = ln.clone()
    trainer.args.max_steps = 1
    trainer.train()
    assert (ln - ln_before).abs().max() < 1e-2 * ln_before.abs().max()


def float64_token_loss(outputs, labels, num_items_in_batch=None):
    """Causal-LM cross-entropy summed over tokens in float64, / the window's token count (GPT-2's own loss
    rounds through float32, which 1/(2ε) amplifies to ~1e-5 in the update)."""
    logits = outputs.logits[:, :-1].double()
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                              reduction="sum")
    return total / (num_items_in_batch if num_items_in_batch is not None else labels[:, 1:].numel())


def _accumulation_run(tmp_path, name, batch, accumulation, **kw):
    model = tiny_gpt2(torch.float64)
    forwards = []
    model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    trainer = ZOTrainer(model=model, args=targs(tmp_path / name, per_device_train_batch_size=batch,
                                                gradient_accumulation_steps=accumulation, max_steps=3),
                        train_dataset=dataset(24), zo_directions=2, **kw)
    out = trainer.train()
    return model, trainer, len(forwards), out


def test_gradient_accumulation_is_one_update_on_the_whole_window(tmp_path):
    start = flat(tiny_gpt2(torch.float64))
    big, t_big, f_big, _ = _accumulation_run(tmp_path, "big", 8, 1, compute_loss_func=float64_token_loss)
    acc, t_acc, f_acc, out = _accumulation_run(tmp_path, "acc", 2, 4, compute_loss_func=float64_token_loss)
    # N = 4 micro-batches make one update, not four: 3 updates, each 2·K·N forward passes.
    assert t_acc.state.global_step == 3 and t_acc.optimizer.optimizer.step_count == 3
    assert f_acc == 3 * 2 * 2 * 4 and f_big == 3 * 2 * 2
    # ... and that update is the one of a batch 4 times larger (same samples, same directions).
    assert (flat(big) - start).abs().max() > 1e-3
    torch.testing.assert_close(flat(acc), flat(big), rtol=0, atol=1e-12)
    assert abs(out.training_loss - t_big.state.log_history[-1]["train_loss"]) < 1e-9
    # The model's own (token-normalised, float32-rounded) loss gives the same update up to that rounding.
    big32, *_ = _accumulation_run(tmp_path, "big32", 8, 1)
    acc32, *_ = _accumulation_run(tmp_path, "acc32", 2, 4)
    rel = (flat(acc32) - flat(big32)).norm() / (flat(big32) - start).norm()
    assert rel < 1e-2, rel


def test_gradient_accumulation_of_mean_losses_divides_by_the_window(tmp_path):
    # A model without num_items_in_batch: each micro-batch loss is a mean, divided by N as Trainer.training_step
    # divides it; the window's objective is again the mean over the 8 samples.
    start = flat(tiny_gpt2(torch.float64))

    def mean_loss(outputs, labels, num_items_in_batch=None):
        return float64_token_loss(outputs, labels, None)

    class MeanZOTrainer(ZOTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.loss_is_scaled_for_ga = False

    def run(name, batch, accumulation):
        model = tiny_gpt2(torch.float64)
        MeanZOTrainer(model=model, args=targs(tmp_path / name, per_device_train_batch_size=batch,
                                              gradient_accumulation_steps=accumulation, max_steps=3),
                      train_dataset=dataset(24), zo_directions=2, compute_loss_func=mean_loss).train()
        return flat(model)

    big, acc = run("big", 8, 1), run("acc", 2, 4)
    assert (big - start).abs().max() > 1e-3
    torch.testing.assert_close(acc, big, rtol=0, atol=1e-12)


def test_a_separate_source_feeds_a_first_order_gradkit_optimizer_and_resumes(tmp_path):
    def run(out, resume=None, **kw):
        model = tiny_gpt2()
        opt = gk.optim.AdamW(model.parameters(), lr=1e-2, kernel="foreach")
        src = gk.sources.SPSA(model, eps=1e-3, n_directions=2, seed=7)
        trainer = ZOTrainer(model=model, args=targs(out, **kw), train_dataset=dataset(), source=src,
                            transforms=[gk.transforms.ClipNorm(1.0)], optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return model, src

    straight, _ = run(tmp_path / "a")
    run(tmp_path / "b", save_strategy="steps", save_steps=4)
    assert torch.load(tmp_path / "b" / "checkpoint-4" / STAGES_FILE, weights_only=False)["source"]["step"] == 4
    resumed, src = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-4"), save_strategy="steps",
                       save_steps=4)
    assert src.step_count == 8
    assert torch.equal(flat(resumed), flat(straight))


def test_schedule_free_gradkit_optimizer_is_evaluated_and_left_at_x(tmp_path):
    model = tiny_gpt2()
    opt = gk.optim.ScheduleFreeAdamW(model.parameters(), lr=1e-2, kernel="foreach")
    seen = []
    trainer = transformers.Trainer(model=model, args=targs(tmp_path, max_steps=6), train_dataset=dataset(),
                                   eval_dataset=dataset(4), optimizers=(opt, None),
                                   callbacks=[GradkitTrainerCallback()])
    trainer.train()
    assert not opt.training  # the callback left the trained model at x
    x = flat(model).clone()
    opt.train()
    y = flat(model).clone()
    assert (x - y).abs().max() > 1e-3
    model.register_forward_pre_hook(lambda m, a: seen.append(flat(m).clone()))
    trainer.evaluate()
    torch.testing.assert_close(seen[0], x, rtol=0, atol=1e-6)  # the Trainer evaluates at x (optimizer.eval())


def test_zotrainer_rejects_inconsistent_setups(tmp_path):
    model = tiny_gpt2()
    adamw = gk.optim.AdamW(model.parameters(), kernel="foreach")
    with pytest.raises(ValueError, match="needs a gradient: pass source="):
        ZOTrainer(model=model, args=targs(tmp_path), train_dataset=dataset(), optimizers=(adamw, None))
    with pytest.raises(ValueError, match="transforms act on .grad"):
        ZOTrainer(model=model, args=targs(tmp_path), train_dataset=dataset(), transforms=[gk.transforms.ClipNorm(1.)])
    with pytest.raises(ValueError, match="zo_eps"):
        ZOTrainer(model=model, args=targs(tmp_path), train_dataset=dataset(), zo_eps=0.0)


def test_resuming_without_the_stage_file_raises(tmp_path):
    model = tiny_gpt2()
    src = gk.sources.SPSA(model, seed=1)
    opt = gk.optim.AdamW(model.parameters(), kernel="foreach")
    args = targs(tmp_path, save_strategy="steps", save_steps=4, max_steps=4)
    ZOTrainer(model=model, args=args, train_dataset=dataset(), source=src, optimizers=(opt, None)).train()
    (tmp_path / "checkpoint-4" / STAGES_FILE).unlink()
    model = tiny_gpt2()
    trainer = ZOTrainer(model=model, args=targs(tmp_path, save_strategy="steps", save_steps=4),
                        train_dataset=dataset(), source=gk.sources.SPSA(model, seed=1),
                        optimizers=(gk.optim.AdamW(model.parameters(), kernel="foreach"), None))
    with pytest.raises(FileNotFoundError, match="would restart from scratch"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
