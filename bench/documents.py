"""How long the gateway takes to turn a document into text, per format, at the sizes its limits
allow: a 200-page PDF (max_pdf_pages), a DOCX of 5,000 paragraphs, an XLSX of 50,000 cells.

The files are built the way tests/test_documents.py builds them (a hand-written PDF, python-docx,
openpyxl); each is extracted --repeat times with gateway.documents.extract_text on its default
limits, and the best time is kept (extraction runs in a worker thread in the gateway; this is
its CPU time on one core).

    .venv/bin/python bench/documents.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_documents import LIMITS, make_docx, make_pdf, make_xlsx

from gateway.documents import DOCX, PDF, XLSX, extract_text

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "documents.json")
    args = parser.parse_args()
    cases = {
        "pdf, 200 pages": (
            make_pdf([f"Page {i} of the quarterly report: revenue and costs." for i in range(200)]),
            PDF,
        ),
        "docx, 5000 paragraphs": (
            make_docx([f"Paragraph {i}: the terms of the contract apply." for i in range(5000)]),
            DOCX,
        ),
        "xlsx, 5000 rows x 10": (
            make_xlsx({"sheet": [[f"r{r}c{c}" for c in range(10)] for r in range(5000)]}),
            XLSX,
        ),
    }
    rows = []
    for name, (data, media_type) in cases.items():
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            text = extract_text(data, media_type, None, LIMITS)
            times.append(time.perf_counter() - started)
        row = {
            "file": name,
            "kib": round(len(data) / 1024),
            "chars": len(text),
            "best_ms": round(min(times) * 1000, 1),
        }
        rows.append(row)
        print(f"{name:24s} {row['kib']:6d} KiB  {row['chars']:8d} chars  {row['best_ms']:7.1f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
