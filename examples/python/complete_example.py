"""The design document's Complete Example in Python (a tiny local 12-layer teacher, a local text file).

    python examples/python/complete_example.py [WORKDIR [CPU_THREADS]]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import make_teacher, write_text_file  # noqa: E402

from entrenar_cli.hf_pipeline import (  # noqa: E402
    Dataset,
    DatasetOptions,
    DistillationCollator,
    DistillationTrainer,
    Exporter,
    ExportFormat,
    FetchOptions,
    HfModelFetcher,
    ModelWeights,
    SafeTensorsTeacher,
    TrainerConfig,
)

EPOCHS = 3


def main(workdir: Path, num_threads: int | None = None) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    text = write_text_file(workdir / "corpus.txt")
    model_dir = make_teacher(workdir / "teacher", text, layers=12, hidden=32)

    # 1. Fetch teacher model (a local directory here; a Hub id such as "microsoft/codebert-base" downloads)
    fetcher = HfModelFetcher.new()
    artifact = fetcher.download_model(str(model_dir), FetchOptions.default())

    # 2. Load teacher
    teacher = SafeTensorsTeacher.from_path(artifact.path)
    print(f"Teacher loaded: {teacher.num_layers()} layers, {teacher.hidden_dim()} hidden dim")

    # 3. Configure distillation: a 4-layer student from teacher layers 2, 5, 8, 11, matched layer by layer
    config = (TrainerConfig.new(str(model_dir), student=[2, 5, 8, 11])
              .temperature(4.0)
              .alpha(0.7)
              .epochs(EPOCHS)
              .batch_size(4)
              .learning_rate(1e-3)
              .num_threads(num_threads)  # None: all cores
              .with_progressive([(0, 2), (1, 5), (2, 8), (3, 11)]))
    trainer = DistillationTrainer.new(config, teacher)

    # 4. Load dataset (Dataset.mock(1000, 32, vocab_size=teacher.vocab_size()) gives random tokens instead)
    dataset = Dataset.from_path(text, teacher, DatasetOptions.default().max_length(32).max_blocks(8).eval_fraction(0.0))
    collator = DistillationCollator.new(teacher.tokenizer.pad_token_id).max_length(32)
    lines = [teacher.tokenizer(line)["input_ids"] for line in ("import json", "def dumps(obj):")]
    print(f"collated example batch: {tuple(collator.collate(lines)['input_ids'].shape)}")

    # 5. Training loop: one real optimizer step per batch on the shared engine
    for epoch in range(EPOCHS):
        for batch in dataset.batches(4, shuffle=True, epoch=epoch):
            trainer.step(batch)
        trainer.end_epoch()
        print(f"Epoch {epoch}: loss={trainer.state().avg_loss():.4f}")

    # the loss of one batch, computed from the student's own forward pass
    batch = next(dataset.batches(4))
    out = trainer.student(batch.input_ids, output_hidden_states=True)
    loss = trainer.compute_loss(out.logits, batch.input_ids, batch.labels, out.hidden_states)
    print(f"compute_loss on the first batch: {loss.item():.4f}")

    # 6. Export distilled model
    weights = ModelWeights.from_model(trainer.student, name="distilled-student", tokenizer_dir=teacher.path)
    result = Exporter.new(workdir / "distilled-model").format(ExportFormat.SafeTensors).export(weights)
    print(f"Exported to: {result.path} ({result.size_human()})")
    print("Distillation complete!")
    return {"trainer": trainer, "state": trainer.state(), "export": result, "loss": loss.item(), "teacher": teacher}


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="entrenar-example-")),
         num_threads=int(sys.argv[2]) if len(sys.argv) > 2 else None)
