"""Corpus and dataset statistics, and the report printed at the end of a build."""

import numpy as np

PERCENTILES = (10, 50, 90, 99)
LONG_DOCUMENT_CHARS = 32_768  # the paper's corpora are long: report how many documents exceed this


def length_summary(lengths) -> dict:
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return dict(count=0, total=0)
    summary = dict(count=len(lengths), total=int(lengths.sum()), mean=round(float(lengths.mean()), 1))
    summary.update({f"p{q}": int(np.percentile(lengths, q)) for q in PERCENTILES})
    summary["max"] = int(lengths.max())
    return summary


def format_table(title: str, rows: dict[str, dict], columns: list[str]) -> str:
    """Rows are named summaries; missing entries print as '-'."""
    width = max([len(title)] + [len(name) for name in rows])
    lines = [f"{title:<{width}}  " + "  ".join(f"{c:>11}" for c in columns)]
    for name, row in rows.items():
        cells = (f"{row[c]:>11,}" if isinstance(row.get(c), int) else f"{row.get(c, '-'):>11}" for c in columns)
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def corpus_report(stats: dict) -> str:
    columns = ["count", "total", "mean", "p10", "p50", "p90", "p99", "max", "long"]
    rows = {split: dict(s["chars"], long=s["long_documents"]) for split, s in stats["splits"].items()}
    lines = [
        f"corpus {stats['source']} ({stats['domain']}): {stats['files_seen']} files read, "
        f"{sum(s['chars']['count'] for s in stats['splits'].values())} documents kept "
        f"(one per {stats.get('document_unit', 'file')})",
        format_table("characters", rows, columns),
        f"(long = documents over {LONG_DOCUMENT_CHARS:,} characters)",
    ]
    for reason, count in stats["skipped"].items():
        example = stats["skipped_examples"].get(reason, "")
        lines.append(f"skipped {count} {reason} (e.g. {example})")
    return "\n".join(lines)


def dataset_report(manifests: dict) -> str:
    columns = ["count", "total", "mean", "p10", "p50", "p90", "p99", "max"]
    rows = {split: m.corpus_stats["tokens"] for split, m in manifests.items()}
    return format_table("tokens", rows, columns)
