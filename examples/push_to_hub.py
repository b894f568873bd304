#!/usr/bin/env python
"""Share a trained Labelformer folder on the Hugging Face Hub, with our model card.

    huggingface-cli login   # or pass --token / set HF_TOKEN
    python examples/push_to_hub.py --model_dir outputs/quick --repo_id your-name/labelformer-reuters

The pushed repository holds safetensors weights, the model, config and pipeline code
(`trust_remote_code=True`), the tokenizer, the run's reports and a README.md model card with the
shipped model's test metrics in its `model-index`, the run's training data (name, sizes, label count,
licence: unknown unless `--dataset_license` names it here or at training time) and a remote-code
warning that names every Python file of the repository. `--dry_run DIR` writes that folder locally instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from modeling.hub_labelformer import prepare_hub_folder, push_to_hub  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Push a trained Labelformer folder to the Hub.")
    p.add_argument("--model_dir", required=True, help="Output folder of examples/train_multilabel.py.")
    p.add_argument("--repo_id", required=True, help="user-or-org/name on the Hub.")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", help="A Hub token with write access (default: the logged-in one).")
    p.add_argument("--commit_message", default="Upload Labelformer model")
    p.add_argument("--dataset_license", help="The training data's licence for the card (default: as recorded "
                   "by the training run, else unknown).")  # fmt: skip
    p.add_argument("--dry_run", metavar="DIR", help="Write the folder that would be pushed to DIR and stop.")
    args = p.parse_args(argv)
    try:
        if args.dry_run:
            folder = prepare_hub_folder(args.model_dir, args.dry_run, args.repo_id, args.dataset_license)
            print(f"Wrote the Hub folder to {folder}")
            return 0
        commit = push_to_hub(args.model_dir, args.repo_id, args.private, args.token, args.commit_message,
                             args.dataset_license)  # fmt: skip
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Pushed to https://huggingface.co/{args.repo_id} ({getattr(commit, 'commit_url', commit)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
