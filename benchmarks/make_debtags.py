"""Build the "debtags" multi-label benchmark from a Debian Packages index.

Each binary package with debtags becomes one document: the text is the package's short description
(the ``Description:`` line, without the package name), the labels are its debtags restricted to topical
facets. Facets that describe form rather than topic (``role``, ``implemented-in``, ``interface``,
``uitoolkit``, ``suite``, ``made-of``, ``special``, ``scope``) are dropped, as are ``devel::lang:*``,
``devel::library`` (half of all tagged packages, a copy of ``role::*-lib``), ``x11::application`` and
``x11::library`` (interface, not topic) and placeholder values (``*::TODO``, ``*::unknown``). Sub-values
are merged into their parent (``works-with::image:raster`` -> ``works-with::image``). Identical
descriptions are kept once (first package in index order). Documents are split by a hash of the source
package name (about 75% train / 25% test, so binaries of one source never straddle the split), each
split is capped with a seeded sample, and labels with fewer than ``--min_count`` documents are dropped,
together with documents left without labels, until nothing changes.

    python benchmarks/make_debtags.py \\
        --packages /var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages.lz4 \\
        --output_dir data/debtags
"""

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
from collections import Counter
from pathlib import Path

DROP_FACETS = {"role", "implemented-in", "interface", "uitoolkit", "suite", "made-of", "special", "scope"}
DROP_TAGS = {"devel::library", "x11::application", "x11::library"}
DROP_VALUES = {"TODO", "unknown"}


def read_index(path: Path) -> str:
    """Return the text of a Packages index, decompressing .lz4 (lz4.frame if importable, else the lz4 CLI)."""
    if path.suffix != ".lz4":
        return path.read_text(encoding="utf-8")
    try:
        import lz4.frame
    except ImportError:
        data = subprocess.run(["lz4", "-dc", str(path)], check=True, capture_output=True).stdout
    else:
        data = lz4.frame.decompress(path.read_bytes())
    return data.decode("utf-8")


def parse_stanzas(text: str):
    """Yield each stanza as a dict of field -> value (continuation lines joined with a space)."""
    for block in text.split("\n\n"):
        fields, key = {}, None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if "Package" in fields:
            yield fields


def topical_tags(tag_field: str) -> list[str]:
    """Restrict a ``Tag:`` field to topical labels, merging sub-values into their parent value."""
    labels = []
    for tag in filter(None, (t.strip() for t in tag_field.split(","))):
        facet, _, value = tag.partition("::")
        if facet in DROP_FACETS or tag in DROP_TAGS or tag.startswith("devel::lang:") or value in DROP_VALUES:
            continue
        label = f"{facet}::{value.split(':')[0]}"
        if label not in labels:
            labels.append(label)
    return sorted(labels)


def build(text: str, test_share: float, max_train: int, max_test: int, min_count: int, seed: int):
    seen, splits = set(), {"train": [], "test": []}
    for fields in parse_stanzas(text):
        labels = topical_tags(fields.get("Tag", ""))
        description = re.sub(r"\s+", " ", fields.get("Description", "")).strip()
        key = description.casefold()
        if not labels or not description or key in seen:
            continue
        seen.add(key)
        source = fields.get("Source", fields["Package"]).split()[0]
        bucket = int(hashlib.sha256(source.encode()).hexdigest()[:8], 16) / 16**8
        splits["test" if bucket < test_share else "train"].append(
            {"id": fields["Package"], "text": description, "labels": labels}
        )
    rng = random.Random(seed)
    for name, cap in (("train", max_train), ("test", max_test)):
        docs = splits[name]
        if len(docs) > cap:
            splits[name] = [docs[i] for i in sorted(rng.sample(range(len(docs)), cap))]
    while True:
        counts = Counter(label for docs in splits.values() for doc in docs for label in doc["labels"])
        rare = {label for label, n in counts.items() if n < min_count}
        if not rare:
            return splits, counts
        for name, docs in splits.items():
            kept = [{**doc, "labels": [x for x in doc["labels"] if x not in rare]} for doc in docs]
            splits[name] = [doc for doc in kept if doc["labels"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", type=Path, required=True, help="Debian Packages index (plain or .lz4)")
    parser.add_argument("--output_dir", type=Path, default=Path("data/debtags"))
    parser.add_argument("--test_share", type=float, default=0.25)
    parser.add_argument("--max_train", type=int, default=9000)
    parser.add_argument("--max_test", type=int, default=3000)
    parser.add_argument("--min_count", type=int, default=50, help="minimum documents per label (train + test)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    splits, counts = build(
        read_index(args.packages), args.test_share, args.max_train, args.max_test, args.min_count, args.seed
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, docs in splits.items():
        path = args.output_dir / f"{name}.jsonl.gz"
        with open(path, "wb") as raw, gzip.GzipFile(filename=path.stem, fileobj=raw, mode="wb", mtime=0) as handle:
            for doc in docs:
                handle.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    n_docs = sum(len(docs) for docs in splits.values())
    print(
        f"train {len(splits['train'])} test {len(splits['test'])} labels {len(counts)} "
        f"labels/doc {sum(counts.values()) / n_docs:.2f} frequency {min(counts.values())}-{max(counts.values())}"
    )


if __name__ == "__main__":
    main()
