"""Q-Tuning as a Trainer plug-in (qtuning.hf_trainer): the engine's decisions and gradient, the Trainer's loop and logs."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from accelerate import Accelerator
from transformers import TrainerCallback, TrainingArguments

from conftest import assert_grads_close
from qtuning.config import DataConfig, PruningConfig
from qtuning.data import build_sft_dataset, collate
from qtuning.hf_trainer import QTuningTrainer, collator, experiment_for, loss_denominator_of
from qtuning.train import learn, loss_denominator, select_pool

HAS_TRL = importlib.util.find_spec("trl") is not None
SEED = 3


@pytest.fixture(scope="module")
def arc_rows(tokenizer):
    return build_sft_dataset(DataConfig(source="arc", limit=16, max_length=160), tokenizer, progress=False).dataset


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, gradient_accumulation_steps=1,
                learning_rate=3e-3, lr_scheduler_type="constant", max_grad_norm=0.0, seed=SEED, report_to=[],
                use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "pruning",
    [
        dict(sample="qtuning", token="qtuning"),
        dict(sample="qtuning", token="qtuning", token_budget="batch_global", loss_norm="all_tokens"),
        dict(sample="infobatch_pool", token="random"),  # per-row weights and seeded randomness
        dict(sample="random", token="ppl", train_on="masked_batch"),
    ],
    ids=["qtuning", "batch_global", "infobatch", "masked"],
)
@pytest.mark.numerics
def test_plugin_keeps_the_engines_rows_and_tokens_and_gives_its_gradient(tmp_path, tokenizer, tiny_model, arc_rows, pruning):
    """Same model, same pools, same seed: the Trainer plug-in and qtuning.train make the same decisions, and
    two accumulated micro-batches give the engine's step gradient (each loss over the whole step's denominator)."""
    pruning = PruningConfig(**pruning)
    args = _args(tmp_path, gradient_accumulation_steps=2)
    trainer = QTuningTrainer(model=copy.deepcopy(tiny_model), args=args, train_dataset=arc_rows,
                             data_collator=collator(tokenizer.pad_token_id), pruning=pruning)
    pools = [arc_rows.select(range(0, 8)), arc_rows.select(range(8, 16))]
    batches = [collator(tokenizer.pad_token_id)(list(p)) for p in pools]

    pruned, denom = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))

    cfg = experiment_for(pruning, args)
    engine_model = copy.deepcopy(tiny_model)
    engine = [
        select_pool(engine_model, collate(p["input_ids"], p["labels"], tokenizer.pad_token_id), cfg,
                    torch.Generator().manual_seed(SEED * 1_000_003 + j))
        for j, p in enumerate(pools)
    ]
    for mb, ref in zip(pruned, engine, strict=True):
        assert torch.equal(mb["labels"], ref.batch.labels)  # same kept rows, same pruned tokens
        assert torch.equal(mb["input_ids"], ref.batch.input_ids)
        assert torch.equal(mb["qtuning_weight"], ref.weight)
    kept = [int(p.sel.keep.sum()) for p in engine]
    assert all(0 < k < 8 for k in kept)
    if pruning.train_on == "kept_rows":
        assert [mb["input_ids"].shape[0] for mb in pruned] == kept  # only kept rows are fed
    assert float(denom) > 0

    for mb in pruned:
        trainer.training_step(trainer.model, mb, denom)
    learn(Accelerator(cpu=True), engine_model, engine, cfg)
    assert_grads_close(_grads(trainer.model), _grads(engine_model), terms=sum(int(mb["attention_mask"].sum()) for mb in pruned))


def test_a_micro_batchs_own_denominator_leaves_out_the_pruned_tokens(tmp_path, tokenizer, tiny_model, arc_rows):
    """compute_loss without the step's count (a subclass calling it alone) divides by the micro-batch's own: under
    loss_norm all_tokens the response tokens token pruning took are not counted again."""
    pruning = PruningConfig(sample="qtuning", token="qtuning", loss_norm="all_tokens")
    args = _args(tmp_path)
    trainer = QTuningTrainer(model=tiny_model, args=args, train_dataset=arc_rows,
                             data_collator=collator(tokenizer.pad_token_id), pruning=pruning)
    batch = collator(tokenizer.pad_token_id)(list(arc_rows.select(range(8))))
    (mb,), _ = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    cfg = experiment_for(pruning, args)
    ref = select_pool(tiny_model, collate(arc_rows[:8]["input_ids"], arc_rows[:8]["labels"], tokenizer.pad_token_id),
                      cfg, torch.Generator().manual_seed(SEED * 1_000_003))
    assert int(ref.pruned_tokens.sum()) > 0  # token pruning took some: the case that counted them twice
    assert float(loss_denominator_of(mb, cfg)) == float(loss_denominator(ref, "all_tokens"))


class _Logs(TrainerCallback):
    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.mark.numerics
def test_trainer_trains_on_kept_rows_and_logs_pruning_metrics(tmp_path, tokenizer, tiny_model, arc_rows):
    logs = _Logs()
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    trainer = QTuningTrainer(model=tiny_model, args=_args(tmp_path, max_steps=2, gradient_accumulation_steps=1),
                             train_dataset=arc_rows, data_collator=collator(tokenizer.pad_token_id),
                             pruning=PruningConfig(sample_ratio=0.25, token_ratio=0.5), callbacks=[logs])
    trainer.train()

    steps = [entry for entry in logs.logs if "loss" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert 0.25 <= entry["prune/kept_samples"] < 1  # K = 2 of 8, more only when the quadrants hold more
        assert 0 < entry["prune/kept_tokens"] < 1
        # kept = the Q2 and Q4 rows plus the fill-ins (rows of other quadrants, taken when those hold fewer than K)
        assert entry["prune/q2"] + entry["prune/q4"] + entry["prune/filled"] == pytest.approx(entry["prune/kept_samples"] * 8)
        assert {"prune/q1", "prune/q3", "prune/alpha", "train/loss_tokens", "time/score_seconds"} <= entry.keys()
    assert steps[1]["train/loss_tokens"] > steps[0]["train/loss_tokens"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())


def test_running_totals_continue_across_a_resume_and_pruning_comes_as_a_dict_or_a_yaml(tmp_path, tokenizer, tiny_model, arc_rows):
    """A run stopped after its checkpoint at step 1 and resumed logs the same train/loss_tokens at step 2 as one
    that never stopped (they restarted from 0); `pruning` may be a dict or a YAML file of PruningConfig fields."""
    def run(name, max_steps, pruning, resume=None):
        logs = _Logs()
        trainer = QTuningTrainer(model=copy.deepcopy(tiny_model), train_dataset=arc_rows, callbacks=[logs],
                                 args=_args(tmp_path / name, max_steps=max_steps, gradient_accumulation_steps=1,
                                            save_strategy="steps", save_steps=1),
                                 data_collator=collator(tokenizer.pad_token_id), pruning=pruning)
        trainer.train(resume_from_checkpoint=resume)
        return [e for e in logs.logs if "loss" in e]

    whole = run("whole", 2, {"sample_ratio": 0.25, "token_ratio": 0.5})
    yaml_file = tmp_path / "pruning.yaml"
    yaml_file.write_text("sample_ratio: 0.25\ntoken_ratio: 0.5\n")
    run("stopped", 1, str(yaml_file))
    resumed = run("stopped", 2, yaml_file, resume=True)
    assert len(resumed) == 1 and resumed[0]["train/loss_tokens"] == whole[1]["train/loss_tokens"]
    assert resumed[0]["train/samples_trained"] == whole[1]["train/samples_trained"]

    from qtuning.config import ConfigError

    with pytest.raises(ConfigError, match="sample_ratio"):
        QTuningTrainer(model=tiny_model, args=_args(tmp_path), train_dataset=arc_rows, pruning={"sample_ratio": 2})


def test_a_short_last_batch_and_a_collator_that_masks_every_eos_are_said(tmp_path, tokenizer, tiny_model, arc_rows):
    """9 rows in batches of 8: the last batch of one row is named with the fix; transformers' language-modelling
    collator with pad = eos masks every end-of-turn token: named with the fix; qtuning's collator: nothing."""
    import warnings

    from transformers import DataCollatorForLanguageModeling

    def caught(collate, rows):
        trainer = QTuningTrainer(model=copy.deepcopy(tiny_model), args=_args(tmp_path, num_train_epochs=1),
                                 train_dataset=rows, data_collator=collate, processing_class=tokenizer, pruning=PruningConfig())
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            trainer.train()
        return [str(w.message) for w in seen if str(w.message).startswith("Q-Tuning:")]

    ours = caught(collator(tokenizer.pad_token_id), arc_rows.select(range(9)))
    assert len(ours) == 1 and "a batch of 1 row(s)" in ours[0] and "dataloader_drop_last=True" in ours[0]
    plain = arc_rows.select(range(8)).remove_columns([c for c in arc_rows.column_names if c != "input_ids"])
    lm = caught(DataCollatorForLanguageModeling(tokenizer, mlm=False), plain)
    assert len(lm) == 1 and "will not learn to end its turns" in lm[0] and "qtuning.hf_trainer.collator" in lm[0]


def test_the_pruning_recipe_is_logged_through_report_to(tmp_path, tokenizer, tiny_model, arc_rows, monkeypatch):
    """report_to=["mlflow"], the Trainer's own integration: the run's params include every PruningConfig field."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "plugin")
    pruning = PruningConfig(sample_ratio=0.25, token_ratio=0.5)
    trainer = QTuningTrainer(model=tiny_model, args=_args(tmp_path, max_steps=1, report_to=["mlflow"]),
                             train_dataset=arc_rows, data_collator=collator(tokenizer.pad_token_id), pruning=pruning)
    import mlflow

    # the callback takes MLFLOW_TRACKING_URI only when this process has no fluent URI yet, and an earlier test in
    # the same process (tasks.tracking's fluent calls) may have set one: point it here, and back afterwards
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        trainer.train()
    finally:
        mlflow.set_tracking_uri(previous)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("plugin").experiment_id])
    params = run.data.params
    assert params["qtuning_sample_ratio"] == "0.25" and params["qtuning_token_ratio"] == "0.5"
    assert {f"qtuning_{f}" for f in PruningConfig.model_fields} <= params.keys()


def test_a_pool_that_keeps_every_row_is_refused_in_trainer_terms(tmp_path):
    with pytest.raises(ValueError, match="per_device_train_batch_size=2"):
        experiment_for(PruningConfig(sample_ratio=0.75), _args(tmp_path, per_device_train_batch_size=2))
    with pytest.raises(ValueError, match="set per_device_train_batch_size=32"):
        experiment_for(PruningConfig(selection_batch_size=32), _args(tmp_path))
    # published InfoBatch needs a data set's score table, which a Trainer's batches cannot feed: said, not faked
    with pytest.raises(ValueError, match="use sample: infobatch_pool"):
        experiment_for(PruningConfig(sample="infobatch", token="random"), _args(tmp_path))
    assert experiment_for(PruningConfig(sample="infobatch_pool", token="random"), _args(tmp_path)).pruning.sample == "infobatch_pool"


@pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install 'qtuning[trl]')")
def test_sft_trainer_with_a_chat_data_set(tmp_path, tokenizer, tiny_model):
    import datasets
    from trl import SFTConfig

    from qtuning.hf_trainer import QTuningSFTTrainer

    chats = [
        {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                      {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]}
        for a in range(4) for b in range(4)
    ]
    logs = _Logs()
    config = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=8, max_steps=2,
                       learning_rate=3e-3, max_length=64, seed=SEED, report_to=[], use_cpu=True, save_strategy="no",
                       logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    trainer = QTuningSFTTrainer(model=tiny_model, args=config, train_dataset=datasets.Dataset.from_list(chats),
                                processing_class=copy.deepcopy(tokenizer), pruning=PruningConfig(), callbacks=[logs])
    trainer.train()
    steps = [entry for entry in logs.logs if "loss" in entry]
    assert len(steps) == 2 and all(0.25 <= e["prune/kept_samples"] < 1 and e["prune/kept_tokens"] < 1 for e in steps)
    assert type(trainer).__mro__[1].__name__ == "QTuningMixin"
    for e in steps:  # TRL's own metrics stay: the loss is its own, over the step's denominator
        assert 0 < e["entropy"] and 0 <= e["mean_token_accuracy"] <= 1 and e["num_tokens"] > 0, e
    assert steps[1]["num_tokens"] > steps[0]["num_tokens"]
    assert trainer.evaluate(eval_dataset=datasets.Dataset.from_list(chats[:8]))["eval_num_tokens"] > 0

    # qtuning's tokenized rows (any data format, labels on assistant tokens only) pass through TRL untouched
    rows = build_sft_dataset(DataConfig(source="arc", limit=8, max_length=160), tokenizer, progress=False).dataset
    long = SFTConfig(output_dir=str(tmp_path / "pre"), per_device_train_batch_size=8, max_length=256, report_to=[],
                     use_cpu=True, dataloader_num_workers=0)
    pre = QTuningSFTTrainer(model=tiny_model, args=long, train_dataset=rows, processing_class=copy.deepcopy(tokenizer),
                            pruning=PruningConfig())
    batch = next(iter(pre.get_train_dataloader()))
    assert int((batch["labels"] != -100).sum()) == sum(rows["response_length"])

    with pytest.raises(ValueError, match="packing=False"):  # before TRL prepares rows it could not tokenize
        QTuningSFTTrainer(model=tiny_model, args=SFTConfig(output_dir=str(tmp_path / "pk"), packing=True,
                                                           per_device_train_batch_size=8, report_to=[], use_cpu=True),
                          train_dataset=datasets.Dataset.from_list([{"bad": 1}] * 8), processing_class=copy.deepcopy(tokenizer))
    with pytest.raises(ValueError, match="padding_free"):
        QTuningSFTTrainer(model=tiny_model, args=SFTConfig(output_dir=str(tmp_path / "pf"), padding_free=True,
                                                           per_device_train_batch_size=8, report_to=[], use_cpu=True),
                          train_dataset=datasets.Dataset.from_list(chats), processing_class=copy.deepcopy(tokenizer))


def _trainer_steps(tmp_path, name: str, processes: int, *average_tokens: bool) -> dict[bool, tuple[dict, list[str]]]:
    """{average_tokens: (weights after one step, digests of the pools triaged)} from one run of
    tests/hf_trainer_step.py in one process or under a `processes`-process `accelerate launch`."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    out = tmp_path / name
    out.mkdir()
    script = [str(Path(__file__).with_name("hf_trainer_step.py")), str(out), str(2 // processes), *(str(int(a)) for a in average_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if processes == 1:
        cmd = [sys.executable, *script]
    else:
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return {a: (load_file(str(out / f"weights-{int(a)}.safetensors")),
                sorted(p for f in out.glob(f"pools-{int(a)}-*.json") for p in json.loads(f.read_text())))
            for a in average_tokens}


@pytest.mark.numerics
def test_two_processes_take_the_trainer_step_of_one_process_with_the_same_global_batch(tmp_path, tiny_model):
    """With `average_tokens_across_devices` (the Trainer's default) each process divides by the whole step's
    loss-token count and DDP's average is undone: 2 processes x 1 pool move the weights as 1 process x 2
    accumulated pools (plain SGD: the step is lr x the gradient). Per-process counts, as before, do not."""
    start = dict(tiny_model.named_parameters())
    one, pools_one = _trainer_steps(tmp_path, "one", 1, True)[True]
    launched = _trainer_steps(tmp_path, "two", 2, True, False)
    (two, pools_two), (own, _) = launched[True], launched[False]
    assert pools_one == pools_two and len(pools_two) == 2  # the same two pools, triaged alike
    moved = {n: one[n] - start[n].detach() for n in one}
    assert max(float(d.abs().max()) for d in moved.values()) > 1e-4
    for n in one:
        torch.testing.assert_close(two[n] - start[n].detach(), moved[n], rtol=1e-3, atol=1e-6, msg=n)
    assert any(not torch.allclose(own[n] - start[n].detach(), moved[n], rtol=1e-2, atol=1e-6) for n in one)
