"""Per-token results: the Parquet export (`--tokens-out FILE`) and an HTML view (`--html FILE`).

One row per predicted position, in the text's order:
- ``block``, ``position``: the block and the target's index in it (a block's first token is
  context only, never a target);
- ``token_id``, ``token``: the target token and its text;
- ``p_<member>`` for each member and ``p_ensemble``: the probability given to the target (the
  ensemble: the headline combination, the mixture);
- ``correct``: whether the ensemble's top-1 prediction is the target;
- ``entropy``, ``aleatoric``, ``mutual_information``: the ensemble's total, aleatoric and
  epistemic uncertainty, in nats.

Streamed: one Parquet row group per evaluated batch, so memory holds one batch's rows whatever the
size of the test set. With several processes each writes its batches to a part file; the first
then joins the parts' row groups in batch order into FILE (one row group in memory at a time) and
removes them. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemble.core.combining import HEADLINE
from ensemble.errors import EnsembleError
from ensemble.files import tmp_name

ENSEMBLE_COLUMN = "p_ensemble"
HTML_TOKENS = 2000  # tokens on the HTML page unless asked otherwise (--html-tokens)


def _part(path: Path, column: int) -> Path:
    return path.with_name(f".{path.name}.part-{column}")


class TokenWriter:
    """Collects a batch's per-token values chunk by chunk and writes them as one row group."""

    def __init__(
        self, path: Path, member_names: list[str], tokenizer: Any, vocab: int, column: int, columns: int
    ):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.column, self.columns = Path(path), column, columns
        self.member_columns = [f"p_{name}" for name in member_names]
        # every token's text, decoded once (Rust, well under a second for 50k tokens)
        self._texts = pa.array(tokenizer.batch_decode([[i] for i in range(vocab)]), type=pa.string())
        fields = [
            ("block", pa.int32()),
            ("position", pa.int32()),
            ("token_id", pa.int32()),
            ("token", pa.string()),
        ]
        fields += [(c, pa.float32()) for c in [*self.member_columns, ENSEMBLE_COLUMN]]
        fields += [("correct", pa.bool_())]
        fields += [(c, pa.float32()) for c in ("entropy", "aleatoric", "mutual_information")]
        self.schema = pa.schema(fields)
        self._target = _part(self.path, column) if columns > 1 else tmp_name(self.path)
        try:  # before any evaluation work: a bad path stops at once
            self._target.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self._target, self.schema)
        except OSError as e:
            raise EnsembleError(
                f"cannot write per-token results in {self.path.parent} ({e.strerror or e}); give "
                "--tokens-out / --html a path in a writable directory"
            ) from None
        self._batch: dict[str, list[np.ndarray]] = {}
        self._offset = 0

    def begin_batch(self, first_block: int, batch: dict[str, torch.Tensor]) -> None:
        mask = batch["target_mask"].cpu()
        rows, length = mask.shape
        self._positions = torch.arange(1, length + 1).expand(rows, length)[mask].numpy()
        self._blocks = (first_block + torch.arange(rows))[:, None].expand(rows, length)[mask].numpy()
        self._offset = 0
        self._batch = {name: [] for name in self.schema.names}

    def add(self, out: Any, targets: torch.Tensor) -> None:
        """One chunk: the scorer's ChunkScores ``out`` and the ``targets``."""
        n = len(targets)
        here = slice(self._offset, self._offset + n)
        self._offset += n
        ensemble = out.combined.get(HEADLINE, out.members[0])
        u = out.uncertainty
        values = {
            "block": self._blocks[here],
            "position": self._positions[here],
            "token_id": targets,
            **{c: m.target_logp.exp() for c, m in zip(self.member_columns, out.members, strict=True)},
            ENSEMBLE_COLUMN: ensemble.target_logp.exp(),
            "correct": ensemble.correct,
            "entropy": ensemble.entropy,
            "aleatoric": u.aleatoric if u is not None else ensemble.entropy,
            "mutual_information": u.epistemic if u is not None else torch.zeros_like(ensemble.entropy),
        }
        for name, v in values.items():  # kept on the device until the batch ends: one copy per batch
            self._batch[name].append(v.detach() if isinstance(v, torch.Tensor) else torch.from_numpy(v))

    def end_batch(self) -> None:
        import pyarrow as pa

        columns = {}
        for field in self.schema:
            if field.name == "token":
                continue
            parts = self._batch[field.name]
            values = torch.cat(parts).cpu().numpy() if parts else []
            columns[field.name] = pa.array(values, type=field.type)
        columns["token"] = self._texts.take(columns["token_id"])
        self._writer.write_table(pa.table({f.name: columns[f.name] for f in self.schema}, schema=self.schema))
        self._batch = {}

    def close(self) -> None:
        self._writer.close()

    def finish(self, n_batches: int) -> Path:
        """On the first process, once every part is closed: the final file."""
        import pyarrow.parquet as pq

        if self.columns == 1:
            self._target.replace(self.path)
            return self.path
        parts = [pq.ParquetFile(_part(self.path, c)) for c in range(self.columns)]
        tmp = tmp_name(self.path)
        with pq.ParquetWriter(tmp, self.schema) as writer:
            for j in range(n_batches):  # batch j is column j % k's row group j // k
                writer.write_table(parts[j % self.columns].read_row_group(j // self.columns))
        for c in range(self.columns):
            _part(self.path, c).unlink()
        tmp.replace(self.path)
        return self.path


# --------------------------------------------------------------------------------------------
# HTML


def _rows(path: Path, limit: int) -> dict[str, list]:
    """The first ``limit`` rows of a token export, reading one row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    tables, seen = [], 0
    for g in range(file.num_row_groups):
        if seen >= limit:
            break
        table = file.read_row_group(g)
        tables.append(table.slice(0, limit - seen))
        seen += len(tables[-1])
    table = pa.concat_tables(tables) if tables else file.schema_arrow.empty_table()
    return table.to_pydict()


def _shade(value: float, low: float, high: float) -> str:
    """A background from white (<= low) to red (>= high)."""
    alpha = min(max((value - low) / (high - low), 0.0), 1.0) if high > low else 0.0
    return f"rgba(220, 40, 40, {alpha:.3f})"


def write_html(tokens_path: Path, html_path: Path, limit: int = HTML_TOKENS, title: str = "") -> Path:
    """A page showing the first ``limit`` tokens of a token export, each shaded by the members'
    disagreement (the mutual information, from white at its 5th percentile to red at its 99th:
    where the members disagree more than elsewhere in the text), with the probabilities and
    uncertainties in a tooltip."""
    rows = _rows(tokens_path, limit)
    members = [c for c in rows if c.startswith("p_") and c != ENSEMBLE_COLUMN]
    mi = np.array(rows["mutual_information"], dtype=np.float64)
    low, high = (float(q) for q in np.quantile(mi, [0.05, 0.99])) if len(mi) else (0.0, 0.0)
    spans, previous_block = [], None
    for i in range(len(mi)):
        if rows["block"][i] != previous_block:  # the split's first block too: its first token is not here
            spans.append(
                f'<span class="cut" title="block {rows["block"][i]} starts: its first token is '
                'context, not scored, not shown">|</span>'
            )
        previous_block = rows["block"][i]
        tip = [
            f"{rows['token'][i]!r}  (block {rows['block'][i]}, position {rows['position'][i]})",
            f"mutual information {rows['mutual_information'][i]:.4f} nats",
            f"entropy {rows['entropy'][i]:.3f}, aleatoric {rows['aleatoric'][i]:.3f}",
            f"p(token): ensemble {rows[ENSEMBLE_COLUMN][i]:.4f}"
            + "".join(f", {m[2:]} {rows[m][i]:.4f}" for m in members),
            "ensemble top-1: " + ("correct" if rows["correct"][i] else "wrong"),
        ]
        spans.append(
            f'<span style="background:{_shade(mi[i], low, high)}" title="{html.escape(chr(10).join(tip))}">'
            f"{html.escape(rows['token'][i])}</span>"
        )
    mean = float(mi.mean()) if len(mi) else math.nan
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title or "ensemble uncertainty")}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; background: #fff; }}
.text {{ font-family: monospace; font-size: 14px; line-height: 1.7; white-space: pre-wrap;
         border: 1px solid #ddd; padding: 1em; }}
.cut {{ color: #aaa; }}
.legend span {{ display: inline-block; width: 3em; text-align: center; font-size: 12px; }}
</style></head><body>
<h2>{html.escape(title or "Where the members disagree")}</h2>
<p>Each token is shaded by the mutual information between the members' next-token distributions
(epistemic uncertainty: what the members disagree on), from white (&le; {low:.3g} nats, the 5th
percentile here) to red (&ge; {high:.3g} nats, the 99th). Hover a token for its probabilities.
{len(mi)} tokens shown, mean mutual information {mean:.4g} nats. A grey | marks where a block
starts, the text's beginning included: a block's first token is only context for the next (nothing
predicts it), so it is not scored and not shown.</p>
<p class="legend">{"".join(f'<span style="background:{_shade(v, low, high)}">{v:.3g}</span>' for v in np.linspace(low, high, 6))}</p>
<div class="text">{"".join(spans)}</div>
</body></html>
"""
    tmp = tmp_name(html_path)
    Path(html_path).parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(html_path)
    return Path(html_path)
