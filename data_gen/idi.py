"""`python -m data_gen.idi -c configs/data/world.yaml [--key value ...]`: run one IDI job.

Writes triplet shards, manifests and per-block scores into `out_dir`, the resolved config
(`idi_config-{split}-r{round}.yaml`, seed included) beside them, and the round report
(`report-{split}-r{round}.{md,json}` + histograms). Rerunning the same command after a kill
resumes it; rerunning a finished job writes nothing new and rewrites the report.
`--print_config` shows every option.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from jsonargparse import ArgumentParser

import data_gen.alterers  # noqa: F401  (registers the alterers)
import data_gen.sources  # noqa: F401  (registers the sources)
from data_gen.job import IDIConfig, describe_job, dumps, run
from data_gen.report import write_report
from data_gen.shards import read_manifest
from emojidiff.options import options_parser


def make_parser() -> ArgumentParser:
    return options_parser(IDIConfig)


def config_from_namespace(parser: ArgumentParser, ns) -> IDIConfig:
    """The IDIConfig of parsed arguments (nested dataclasses such as `filters` instantiated)."""
    init = parser.instantiate(ns)
    values = {k: v for k, v in vars(init).items() if k != "config" and not k.startswith("_")}
    return IDIConfig(**values)


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = make_parser()
    ns = parser.parse_args(argv)
    config = config_from_namespace(parser, ns)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{config.split}-r{config.round}"
    dump = ns.clone()
    del dump["config"]
    # Written before the run (every rank writes the same bytes, atomically), so a killed job has it too.
    tmp = out / f".tmp-idi_config-{stem}-{os.getpid()}.yaml"
    tmp.write_text(parser.dump(dump))
    os.replace(tmp, out / f"idi_config-{stem}.yaml")
    started_wall, t0 = time.time(), time.perf_counter()
    trainer, module = run(config)
    seconds = time.perf_counter() - t0
    if not trainer.is_global_zero:
        return None
    records = [r for r in read_manifest(out, config.split, config.round) if r["time"] >= started_wall]
    job = describe_job(config, module)
    (out / f"idi_job-{stem}.json").write_text(
        dumps({**job, "seed": config.seed, "world_size": trainer.world_size})
    )
    report = write_report(
        out,
        config.split,
        config.round,
        [a.get("name", "?") for a in job["alterers"]],
        job["filters"],
        {
            "seconds": seconds,
            "world_size": trainer.world_size,
            "run_targets": sum(r["targets"] for r in records),
            "run_samples": sum(int(r["samples"].get(str(config.round), 0)) for r in records),
        },
    )
    print(
        f"IDI {stem}: {report['summary']['all']['accepted']} triplets in {report['shards']['count']} shards "
        f"({report['shards']['bytes'] / 2**20:.1f} MiB); report: {out / f'report-{stem}.md'}"
    )
    return report


if __name__ == "__main__":
    main()
