"""Container entrypoint: ``python -m jobs run --spec /etc/lora-jobs/spec.yaml`` (the command every image
and rendered Job uses; the trainer's main is jobs/trainer/main.py)."""
from jobs.trainer.main import main

if __name__ == "__main__":
    raise SystemExit(main())
