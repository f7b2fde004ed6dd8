"""The `mmsanitize` command line: a thin click layer that parses, calls a library function, prints.

Heavy libraries (torch, faiss, open_clip, dask) are imported inside the library functions so
`mmsanitize --help` stays instant. Every MmsanitizeError becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import json
import sys

import click

from .errors import MmsanitizeError


def dask_options(f):
    """`--scheduler` and `--workers` for every verb that touches shards."""
    f = click.option("--workers", type=int, default=None,
                     help="Worker processes of the local Dask cluster (default: cores).")(f)
    f = click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="Address of an existing Dask scheduler (tcp://host:8786); default: start a local cluster.")(f)
    return f


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print rows as an aligned plain-text table."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmsanitize")
def cli():
    """Red-team and clean image-text datasets stored as WebDataset shards.

    \b
    Typical loop:
      mmsanitize datasets build openclipart data/oca/
      mmsanitize poison data/oca/train/ --attack single-label --goal dog2boat --out runs/p/
      mmsanitize scan runs/p/ --model runs/ref/ --threshold auto --out runs/p-scan/
      mmsanitize sanitize runs/p/ --scan runs/p-scan/ --out runs/p-clean/
    """


# ----------------------------------------------------------------------------- foundation


@cli.command()
@click.argument("shards")
@dask_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(shards, scheduler, workers, as_json):
    """Samples, shards, bytes, class counts, caption lengths and problems of a dataset.

    Example: mmsanitize info data/oca/train/
    """
    from .info import dataset_info

    summary = dataset_info(shards, scheduler=scheduler, workers=workers)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"samples {summary['samples']:,}  shards {summary['shards']}  "
               f"bytes {summary['bytes']:,}  image bytes {summary['image_bytes']:,}")
    cw = summary["caption_words"]
    click.echo(f"caption words: min {cw['min']}  mean {cw['mean']}  median {cw['median']}  max {cw['max']}")
    print_table([{"class": k, "samples": v} for k, v in summary["classes"].items()])
    for p in summary["problems"]:
        click.echo(f"problem: {p}")


@cli.command()
@click.argument("shards")
@dask_options
def catalog(shards, scheduler, workers):
    """Build (or refresh) the per-sample catalog of a dataset and print where it is.

    Example: mmsanitize catalog data/oca/train/
    """
    from .catalog import build_catalog, catalog_dir
    from .shards import expand_shards

    df = build_catalog(shards, scheduler=scheduler, workers=workers)
    click.echo(f"{len(df):,} samples catalogued in {catalog_dir(expand_shards(shards)) / 'catalog.parquet'}")


# ----------------------------------------------------------------------------- datasets / ingest
# ----------------------------------------------------------------------------- poison
# ----------------------------------------------------------------------------- models / train / evaluate
# ----------------------------------------------------------------------------- embed / scan / sanitize


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the click group, turning MmsanitizeError into one line + exit 2."""
    try:
        cli.main(args=argv, prog_name="mmsanitize", standalone_mode=False)
    except MmsanitizeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
