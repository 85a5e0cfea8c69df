"""The design document's Python API (entrenar_cli.hf_pipeline): real values through the real engine."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from entrenar_cli.config import schema
from entrenar_cli.errors import ConfigError, EntrenarError, ModelError, UsageError
from entrenar_cli.hf_pipeline import (
    Architecture,
    AttentionTransfer,
    Dataset,
    DatasetOptions,
    DistillationLoss,
    DistillationTrainer,
    DistillationYamlConfig,
    FetchOptions,
    FineTuneConfig,
    FineTuneMethod,
    HfModelFetcher,
    LoRAConfig,
    MemoryEstimate,
    MixedPrecision,
    ProgressiveDistillation,
    SafeTensorsTeacher,
    Split,
    TeacherCache,
    TrainerConfig,
    WeightFormat,
)

REPO = Path(__file__).resolve().parent.parent


def _no_cli_flags(exc: EntrenarError) -> None:
    assert "--" not in str(exc), str(exc)


# ---- losses --------------------------------------------------------------------------------------

def test_documented_loss_example_with_plain_lists() -> None:
    loss_fn = DistillationLoss.new().temperature(4.0).alpha(0.7)
    loss = loss_fn.forward([[7.0, 3.0, 2.0], [2.0, 8.0, 3.0]], [[10.0, 2.0, 1.0], [1.0, 12.0, 2.0]], [0, 1])
    assert float(loss) == pytest.approx(1.181182, abs=2e-6)
    assert f"{loss:.4f}" == "1.1812"


def test_loss_defaults_are_the_schema_defaults() -> None:
    d = schema.DistillationSettings()
    loss = DistillationLoss()
    assert (loss.settings.temperature, loss.settings.alpha) == (d.temperature, d.alpha)
    assert ProgressiveDistillation([(0, 1)]).settings.weight == schema.ProgressiveSettings().weight
    assert AttentionTransfer().settings.weight == schema.AttentionSettings().weight
    with pytest.raises(ConfigError) as err:
        DistillationLoss().temperature(0.0)
    assert "DistillationLoss.temperature(0.0)" in str(err.value)
    _no_cli_flags(err.value)


def test_progressive_and_attention_losses_match_hand_values() -> None:
    s = [[[[0.0, 0.0], [1.0, 1.0]]], [[[1.0, 0.0], [0.0, 1.0]]]]  # two layers of [1, 2, 2]
    t = [[[[0.0, 2.0], [1.0, 1.0]]], [[[1.0, 0.0], [0.0, 1.0]]]]
    # pair (0, 0): token MSEs (0 + 4) / 2 = 2 and 0 -> mean over 2 tokens 1.0; pair (1, 1): 0 -> mean 0.5
    got = ProgressiveDistillation([(0, 0), (1, 1)]).weight(0.5).compute_loss([torch.tensor(x) for x in s],
                                                                            [torch.tensor(x) for x in t])
    assert float(got) == pytest.approx(0.5 * 0.5)
    a = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    assert float(AttentionTransfer().compute_loss([a], [a])) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(UsageError):
        ProgressiveDistillation([(0, 0)]).compute_loss([torch.zeros(1, 2, 3)], [torch.zeros(1, 2, 4)])


# ---- builders, enums, fetchers ------------------------------------------------------------------

def test_fetch_options_builder_and_token_hidden(tmp_path: Path) -> None:
    from entrenar_cli.hub import WeightFormat as HubFormat

    opts = FetchOptions.default().format(WeightFormat.SafeTensors).cache_dir("~/.cache/entrenar")
    assert opts.options.format is HubFormat.SAFETENSORS
    assert opts.options.cache_dir == Path("~/.cache/entrenar").expanduser()
    assert WeightFormat.SafeTensors is WeightFormat.SAFETENSORS and WeightFormat.SafeTensors == HubFormat.SAFETENSORS
    fetcher = HfModelFetcher.with_token("hf_secret_value")
    assert isinstance(fetcher, HfModelFetcher) and fetcher.has_token
    assert "hf_secret" not in repr(fetcher) and "hf_secret" not in repr(fetcher.with_token(None))
    with pytest.raises(UsageError) as err:
        fetcher.download_model("org/name", FetchOptions.default().format(WeightFormat.PyTorch))
    assert "allow_pickle(True)" in err.value.hint
    _no_cli_flags(err.value)


def test_trainer_config_defaults_builder_and_errors() -> None:
    cfg = TrainerConfig("teacher/model", "student/model")
    assert cfg.training == schema.TrainingSettings() and cfg.distillation == schema.DistillationSettings()
    same = TrainerConfig.new("teacher/model", "student/model")
    assert same.training == cfg.training
    built = (cfg.temperature(4.0).alpha(0.7).learning_rate(1e-4).epochs(10).batch_size(32)
             .with_progressive([(0, 3), (1, 7), (2, 11)]).with_attention_transfer(0.1))
    assert built is cfg
    d, t = cfg.distillation, cfg.training
    assert (d.temperature, d.alpha, t.learning_rate, t.epochs, t.batch_size) == (4.0, 0.7, 1e-4, 10, 32)
    assert d.progressive.enabled and d.progressive.layer_mapping == [(0, 3), (1, 7), (2, 11)]
    assert d.progressive.weight == schema.ProgressiveSettings().weight
    assert d.attention.enabled and d.attention.weight == 0.1
    yaml_cfg = cfg.to_yaml_config(dataset_path="data.txt", output_dir="out")
    assert isinstance(yaml_cfg, schema.DistillationYamlConfig) and yaml_cfg.distillation.temperature == 4.0
    layers = TrainerConfig("t", student=3)
    assert layers.student.init_from_teacher.layers == 3 and layers.student.model_id is None
    for bad, where in ((lambda: cfg.temperature(25.0), "TrainerConfig.temperature(25.0)"),
                       (lambda: cfg.epochs(0), "TrainerConfig.epochs(0)"),
                       (lambda: cfg.with_progressive([]), "with_progressive")):
        with pytest.raises(ConfigError) as err:
            bad()
        assert where in str(err.value)
        _no_cli_flags(err.value)


def test_yaml_config_to_trainer_config() -> None:
    cfg = DistillationYamlConfig.from_file(str(REPO / "examples/configs/distill-design-doc.yaml"))
    assert isinstance(cfg, DistillationYamlConfig) and isinstance(cfg.validate(), DistillationYamlConfig)
    tc = cfg.to_trainer_config()
    assert isinstance(tc, TrainerConfig)
    assert tc.distillation == cfg.distillation and tc.training == cfg.training and tc.dataset == cfg.dataset
    tc.temperature(2.0)
    assert cfg.distillation.temperature != 2.0 or tc.distillation is not cfg.distillation


def test_dataset_options_one_class_schema_defaults() -> None:
    opts = DatasetOptions.default().split(Split.Train).streaming(True)
    d = opts.dataset_settings(path="x.txt")
    ref = schema.DatasetSettings(path="x.txt")
    assert d == ref
    hub = DatasetOptions().split(Split.Validation).hub_options()
    assert hub.split == "validation"
    with pytest.raises(ConfigError) as err:
        DatasetOptions().max_length(0)
    assert "DatasetOptions.max_length(0)" in str(err.value)


def test_teacher_cache_in_memory() -> None:
    cache = TeacherCache.new(2)
    cache.cache_logits(0, [[1.0, 2.0]])
    cache.cache_hidden_states(0, [torch.zeros(1, 3)])
    cache.cache_logits(1, torch.ones(1, 2))
    assert cache.get(0).logits.tolist() == [[1.0, 2.0]] and len(cache.get(0).hidden_states) == 1
    cache.cache_logits(2, torch.ones(1, 2))  # evicts 1, the least recently used
    assert cache.get(1) is None and 0 in cache and 2 in cache and len(cache) == 2
    assert cache.hit_rate() == pytest.approx(2 / 3)
    with pytest.raises(UsageError):
        TeacherCache(0)


def test_memory_estimate_and_finetune_config() -> None:
    est = MemoryEstimate.from_architecture(Architecture.Llama, 7_000_000_000)
    assert est.fp32_bytes == 28_000_000_000 and est.fp16_bytes == 14_000_000_000
    assert 3.5e9 < est.int4_bytes < 4.2e9  # NF4 Linear weights, 16-bit embeddings
    assert est.fits_in(16 * 1024**3) and not est.fits_in(12 * 1024**3)
    assert est.fits_in(4 * 2**30, dtype="int4") and not est.fits_in(4 * 2**30, dtype="fp32")
    exact = MemoryEstimate.from_architecture({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4,
                                              "vocab_size": 100, "n_positions": 32,
                                              "architectures": ["GPT2LMHeadModel"]})
    # wte 100x64 + wpe 32x64 + 2 blocks x (2 norms + attn 64x192+192 + 64x64+64 + mlp 64x256+256 + 256x64+64) + ln_f
    block = 2 * 128 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
    assert exact.parameters == 100 * 64 + 32 * 64 + 2 * block + 128 and exact.fp32_bytes == 4 * exact.parameters
    lora = LoRAConfig.builder().rank(64).alpha(16.0).target_modules(["q_proj", "k_proj", "v_proj", "o_proj"]).build()
    assert lora.dropout == schema.LoRASettings().dropout
    full = FineTuneConfig.builder("model-id").method(FineTuneMethod.Full).learning_rate(1e-5).build()
    assert full.learning_rate == 1e-5 and full.batch_size == schema.TrainingSettings().batch_size
    qlora = (FineTuneConfig.builder("model-id").method(FineTuneMethod.QLoRA(lora_config=lora, bits=4))
             .learning_rate(1e-4).mixed_precision(MixedPrecision.BF16).build())
    lora_ft = FineTuneConfig.builder("model-id").method(FineTuneMethod.LoRA(lora)).learning_rate(1e-4).build()
    q, l_ = qlora.estimate_memory(7_000_000_000), lora_ft.estimate_memory(7_000_000_000)
    assert 0 < l_.savings_percent < q.savings_percent < 100 and q.total_bytes < l_.total_bytes < q.full_finetune_bytes
    with pytest.raises(ConfigError):
        LoRAConfig.builder().rank(0)


# ---- teacher --------------------------------------------------------------------------------------

def test_safetensors_teacher_computes(tiny_llama: Path) -> None:
    teacher = SafeTensorsTeacher.from_path(tiny_llama / "model.safetensors")
    assert (teacher.num_layers(), teacher.hidden_dim()) == (4, 64)
    params = sum(p.numel() for p in teacher.model.parameters())
    assert teacher.memory_estimate().parameters == params
    ids = [[5, 6, 7, 8, 9]]
    logits = teacher.forward(ids)
    ref = teacher.model(torch.tensor(ids)).logits
    assert logits.shape == (1, 5, 512) and torch.allclose(logits, ref)
    hidden = teacher.hidden_states(ids)
    out = teacher.model(torch.tensor(ids), output_hidden_states=True)
    assert len(hidden) == 5 and torch.equal(hidden[0], out.hidden_states[1]) and torch.equal(hidden[-1],
                                                                                          out.hidden_states[0])
    attn = teacher.attention_weights(ids)
    assert len(attn) == 4 and attn[0].shape == (1, 4, 5, 5)
    assert torch.allclose(attn[0].sum(-1), torch.ones(1, 4, 5), atol=1e-5)


def test_pickle_only_directory_refused(tmp_path: Path, tiny_llama: Path) -> None:
    import shutil

    from safetensors.torch import load_file

    shutil.copy(tiny_llama / "config.json", tmp_path / "config.json")
    torch.save(load_file(tiny_llama / "model.safetensors"), tmp_path / "pytorch_model.bin")  # writing, not loading
    with pytest.raises(ModelError) as err:
        SafeTensorsTeacher.from_path(tmp_path)
    assert "pickle" in str(err.value)
    _no_cli_flags(err.value)


# ---- trainer --------------------------------------------------------------------------------------

def _fp32_config(teacher_dir: Path, **kw: object) -> TrainerConfig:
    return (TrainerConfig(str(teacher_dir), student=2).temperature(2.0).alpha(0.5).learning_rate(3e-3)
            .batch_size(4).mixed_precision("fp32").num_threads(1).lr_scheduler("constant"))


@pytest.fixture(scope="module")
def small_dataset(tiny_llama: Path, stdlib_text: Path) -> Dataset:
    teacher = SafeTensorsTeacher.from_path(tiny_llama)
    return Dataset.from_path(stdlib_text, teacher, DatasetOptions().max_length(16).max_blocks(12))


def test_step_lowers_the_loss_and_matches_compute_loss(tiny_llama: Path, small_dataset: Dataset) -> None:
    teacher = SafeTensorsTeacher.from_path(tiny_llama)
    trainer = DistillationTrainer(_fp32_config(tiny_llama), teacher)
    batch = next(small_dataset.batches(4))
    with torch.no_grad():
        before = float(trainer.compute_loss(trainer.student(batch.input_ids).logits, batch.input_ids, batch.labels))
    losses = [trainer.step(batch) for _ in range(6)]
    # the engine's loss of a step is the loss before its update: the same number compute_loss gives
    assert losses[0] == pytest.approx(before, rel=1e-5)
    assert losses[-1] < 0.9 * losses[0]
    state = trainer.state()
    assert state.step == 6 and state.avg_loss() == pytest.approx(sum(losses) / 6)
    trainer.end_epoch()
    assert state.epoch == 1 and state.epoch_losses == [pytest.approx(sum(losses) / 6)]


def test_train_whole_epochs_and_save(tiny_llama: Path, small_dataset: Dataset, tmp_path: Path) -> None:
    teacher = SafeTensorsTeacher.from_path(tiny_llama)
    trainer = DistillationTrainer(_fp32_config(tiny_llama).epochs(2).output_dir(str(tmp_path / "run")), teacher)
    result = trainer.train(small_dataset)
    per_epoch = len(small_dataset) // 4
    assert result["status"] == "completed" and result["steps"] == 2 * per_epoch
    state = trainer.state()
    assert state.epoch == 2 and len(state.losses) == 2 * per_epoch
    assert state.epoch_losses[1] < state.epoch_losses[0]
    assert state.avg_loss() == pytest.approx(sum(state.losses[per_epoch:]) / per_epoch)
    out = trainer.save(tmp_path / "student")
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 2
    with pytest.raises(UsageError) as err:
        trainer.save(tmp_path / "student")
    assert "overwrite=True" in err.value.hint


def test_simulated_bookkeeping_is_only_bookkeeping(tiny_llama: Path) -> None:
    trainer = DistillationTrainer(_fp32_config(tiny_llama), SafeTensorsTeacher.from_path(tiny_llama))
    weights = [p.detach().clone() for p in trainer.student.parameters()]
    for loss in (1.0, 0.5, torch.tensor(0.3)):
        trainer.simulate_step(loss)
    trainer.simulate_epoch()
    assert trainer.state().avg_loss() == pytest.approx(0.6) and trainer.state().simulated_steps == 3
    trainer.simulate_step(0.2)
    assert trainer.state().avg_loss() == pytest.approx(0.2)
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.student.parameters()))
    assert math.isnan(DistillationTrainer(_fp32_config(tiny_llama),
                                          SafeTensorsTeacher.from_path(tiny_llama)).state().avg_loss())


def test_trainer_errors_name_python_arguments(tiny_llama: Path) -> None:
    teacher = SafeTensorsTeacher.from_path(tiny_llama)
    with pytest.raises(ConfigError) as err:
        DistillationTrainer(_fp32_config(tiny_llama).with_progressive([(0, 9)]), teacher)
    assert "with_progressive" in str(err.value)
    _no_cli_flags(err.value)
    with pytest.raises(EntrenarError) as err2:
        DistillationTrainer(_fp32_config(tiny_llama), teacher).train(Dataset.mock(2, 8, vocab_size=512))
    assert "TrainerConfig.batch_size" in str(err2.value)
    _no_cli_flags(err2.value)


# ---- the document's examples ---------------------------------------------------------------------

def _example(name: str):  # noqa: ANN202
    path = REPO / "examples" / "python" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_quick_start_example(tmp_path: Path) -> None:
    out = _example("quick_start").main(tmp_path, num_threads=1)
    assert out["result"]["status"] == "completed"
    losses = out["state"].epoch_losses
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert (out["saved"] / "model.safetensors").is_file()


def test_complete_example(tmp_path: Path) -> None:
    mod = _example("complete_example")
    out = mod.main(tmp_path, num_threads=1)
    assert out["teacher"].num_layers() == 12
    losses = out["state"].epoch_losses
    assert len(losses) == mod.EPOCHS and losses[-1] < losses[0]
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    assert (out["export"].path / "model.safetensors").is_file()


def test_dataset_fetcher_local_parquet_and_mock(tmp_path: Path, tiny_llama: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from entrenar_cli.hf_pipeline import HfDatasetFetcher

    (tmp_path / "data").mkdir()
    rows = [f"def f{i}(x):\n    return x + {i}\n" for i in range(60)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "data" / "train-00000-of-00001.parquet")
    fetcher = HfDatasetFetcher.new()
    paths = fetcher.fetch(str(tmp_path), DatasetOptions.default().split(Split.Train).streaming(True))
    assert [p.name for p in paths] == ["train-00000-of-00001.parquet"]
    assert fetcher.load_parquet(paths[0]).num_rows == 60
    teacher = SafeTensorsTeacher.from_path(tiny_llama)
    ds = Dataset.from_path(paths[0], teacher, DatasetOptions().max_length(16).eval_fraction(0.0))
    tokens = sum(len(teacher.tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    assert len(ds) == (tokens - 1) // 16
    mock = Dataset.mock(10, 8, vocab_size=50, seed=1)
    batches = list(mock.batches(4))
    assert len(mock) == 10 and [b.input_ids.shape for b in batches] == [(4, 8), (4, 8), (2, 8)]
    assert int(batches[0].input_ids.max()) < 50 and torch.equal(batches[0].labels[:, :-1], batches[0].input_ids[:, 1:])


def test_data_errors_name_python_calls(tmp_path: Path) -> None:
    with pytest.raises(EntrenarError) as err:
        Dataset.from_path(tmp_path / "missing" / "*.txt", "tokenizer")
    assert "Dataset.from_path(path)" in str(err.value) and "dataset.path" not in str(err.value)
    _no_cli_flags(err.value)


def test_attention_transfer_and_progressive_in_the_step(tiny_llama: Path, small_dataset: Dataset) -> None:
    teacher = SafeTensorsTeacher.from_path(tiny_llama)
    config = _fp32_config(tiny_llama).with_progressive([(0, 0), (1, 3)]).with_attention_transfer(0.1)
    trainer = DistillationTrainer(config, teacher)
    batch = next(small_dataset.batches(4))
    out = trainer.student(batch.input_ids, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        expected = float(trainer.compute_loss(out.logits, batch.input_ids, batch.labels, out.hidden_states,
                                              out.attentions))
    loss = trainer.step(batch)
    terms = trainer.last_terms
    assert terms["loss_attn"] > 0 and terms["loss_hidden"] > 0
    assert loss == pytest.approx(expected, rel=1e-5)
    with pytest.raises(UsageError) as err:
        trainer.compute_loss(out.logits, batch.input_ids, batch.labels)
    assert "student_hiddens" in str(err.value)
    # no mapping: each student block with the teacher block it was copied from, on the trainer's copy only
    default = _fp32_config(tiny_llama).with_progressive()
    assert DistillationTrainer(default, teacher).config.distillation.progressive.layer_mapping == [(0, 0), (1, 3)]
    assert default.distillation.progressive.layer_mapping is None
