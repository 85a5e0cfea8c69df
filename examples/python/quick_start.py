"""The design document's Quick Start in Python (a tiny local teacher instead of codebert-base).

    python examples/python/quick_start.py [WORKDIR [CPU_THREADS]]
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
    DistillationTrainer,
    FetchOptions,
    HfModelFetcher,
    SafeTensorsTeacher,
    TrainerConfig,
)


def main(workdir: Path, num_threads: int | None = None) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    text = write_text_file(workdir / "corpus.txt")
    model_dir = make_teacher(workdir / "teacher", text, layers=4, hidden=32)

    # 1. Fetch the teacher (a Hub id such as "microsoft/codebert-base" downloads; a local directory is checked)
    fetcher = HfModelFetcher.new()
    artifact = fetcher.download_model(str(model_dir), FetchOptions.default())

    # 2. Load as teacher (SafeTensors only)
    teacher = SafeTensorsTeacher.from_path(artifact.path)

    # 3. Configure distillation: a student made of 2 of the teacher's 4 layers
    config = (TrainerConfig.new(str(model_dir), student=2)
              .temperature(4.0)
              .alpha(0.7)
              .epochs(10)
              .batch_size(4)
              .learning_rate(1e-3)
              .num_threads(num_threads))  # None: all cores

    # 4. Create the trainer and train on a local text file
    trainer = DistillationTrainer.new(config, teacher)
    dataset = Dataset.from_path(text, teacher, DatasetOptions.default().max_length(32).max_blocks(8).eval_fraction(0.0))
    result = trainer.train(dataset)
    state = trainer.state()
    for epoch, loss in enumerate(state.epoch_losses):
        print(f"Epoch {epoch}: loss={loss:.4f}")
    saved = trainer.save(workdir / "student")
    print(f"{result['steps']} steps; student saved to {saved}")
    return {"result": result, "state": state, "saved": saved, "teacher": teacher}


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="entrenar-quick-start-")),
         num_threads=int(sys.argv[2]) if len(sys.argv) > 2 else None)
