"""``convcg retrieve``: candidates for a file of requests, streamed in chunks with bounded memory.

Requests are read ``chunk_rows`` at a time from a parquet file and ranked by the served model's own
:meth:`~convcg_cli.serve.model.CandidateModel.candidates` (the code path of ``predict`` and of
``convcg eval``); each chunk's ``(request, rank, item_id, score)`` rows are appended to the output
parquet file, written atomically (a temporary file ``.<out>.partial-<pid>@<host>~`` renamed at the
end; one a killed retrieval left is removed by the next one writing the same file). Memory: one
chunk of requests and its ``chunk_rows * k`` candidates, whatever the file's size; ``k`` and the
chunk are bounded by the served model's limits (``max_k``: a larger ``k`` is refused; ``max_rows``:
a larger chunk is cut to it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from convcg_cli import tracking, workdir
from convcg_cli.errors import ConvcgError, first_line
from convcg_cli.serve.bundle import REQUIRED_COLUMNS
from convcg_cli.serve.model import CandidateModel

DEFAULT_CHUNK_ROWS = 10_000


@dataclass(frozen=True)
class RetrieveResult:
    """What a batch retrieval wrote: requests read, candidate rows written, seconds spent ranking."""

    out: Path
    requests: int
    rows: int
    seconds: float


def served_model_uri(store: tracking.Store, model: str) -> str:
    """A model URI from ``--run``: ``models:/NAME@ALIAS`` (or any ``models:/``, ``runs:/`` URI) or a
    saved model's directory as given; a run id or ``latest`` becomes that run's ``runs:/ID/model``."""
    if model.startswith(("models:/", "runs:/")) or Path(model, "MLmodel").is_file():
        return model
    return f"runs:/{tracking.resolve_run(store, model)}/{tracking.SERVED_MODEL_NAME}"


def load_candidate_model(store: tracking.Store, model: str) -> CandidateModel:
    """The served model behind ``model`` (see :func:`served_model_uri`), loaded as MLflow loads it;
    its files are downloaded into a command directory removed once it is read (it lives in memory)."""
    with workdir.command_dir("load") as scratch:
        served = tracking.load_served_model(store, served_model_uri(store, model), scratch)
        return served.unwrap_python_model().model


def retrieve_file(
    model: CandidateModel, requests: Path, out: Path, k: int, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> RetrieveResult:
    """Rank every request of the parquet file ``requests`` and write the top ``k`` to ``out``
    (nothing is left behind when a chunk fails). ``request`` in the output is the request's row
    number in the file (0-based)."""
    import pyarrow.parquet as pq

    if chunk_rows < 1:
        raise ConvcgError(f"--chunk-rows must be >= 1, got {chunk_rows}.")
    limits = model.bundle.limits
    if k > limits["max_k"]:
        raise ConvcgError(
            f"--k {k} is over the served model's limit of {limits['max_k']} candidates per request "
            "(serve.max_k when the run was trained or exported): ask for fewer, or export the run "
            f"again with a higher limit ('convcg export --run ID --max-k {k}')."
        )
    chunk_rows = min(chunk_rows, limits["max_rows"])  # what one call of the model may hold
    if not requests.is_file():
        raise ConvcgError(f"The requests file {requests} does not exist; expected a parquet file.")
    if out.is_dir():
        raise ConvcgError(f"--out {out} is a directory; give the path of the parquet file to write.")
    try:
        reader = pq.ParquetFile(requests)
    except Exception as exc:  # pyarrow's ArrowInvalid / OSError: not parquet, or cut short
        raise ConvcgError(
            f"The requests file {requests} is not a readable parquet file ({first_line(exc)}); it may be "
            f"cut short. Write it again, with the columns {', '.join(REQUIRED_COLUMNS)}."
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir.sweep_stale(out, ("partial",))  # what killed retrievals into the same file left
    partial = out.with_name(workdir.temp_beside(out, "partial"))
    n_requests = n_rows = 0
    seconds = 0.0
    empty = model.candidates(pl.DataFrame(schema=REQUIRED_COLUMNS), k).to_arrow()
    try:
        with workdir.exit_on_sigterm(), pq.ParquetWriter(partial, empty.schema) as writer:
            writer.write_table(empty)  # the schema, even for a file without requests
            for batch in _batches(reader, requests, chunk_rows):
                start = time.perf_counter()
                chunk = pl.from_arrow(batch)
                assert isinstance(chunk, pl.DataFrame)
                candidates = model.candidates(chunk, k, first_request=n_requests).to_arrow()
                seconds += time.perf_counter() - start
                writer.write_table(candidates)
                n_requests, n_rows = n_requests + chunk.height, n_rows + candidates.num_rows
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    return RetrieveResult(out, n_requests, n_rows, seconds)


def _batches(reader, requests: Path, chunk_rows: int):
    """The file's record batches; a row group that cannot be read (a file cut short after its
    footer was written) is a ConvcgError naming the file and the rows read so far."""
    batches = reader.iter_batches(batch_size=chunk_rows)
    read = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:  # pyarrow's ArrowInvalid / OSError mid-file
            raise ConvcgError(
                f"The requests file {requests} could not be read past row {read:,} ({first_line(exc)}): it "
                "is damaged or cut short. Nothing was written; write the file again."
            ) from None
        read += batch.num_rows
        yield batch
