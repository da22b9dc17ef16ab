"""Convert a RAFT dataset between formats: a library for raft.py and a command line for users.

  python format.py --input output --input-type arrow --output output/raft_chat.jsonl \
      --output-format chat --output-type jsonl --output-chat-system-prompt "You are a helpful assistant."

Formats:
  hf          the RAFT record as it is (design.md section 2)
  completion  {"prompt": instruction, "completion": cot_answer}
  chat        {"messages": [system?, user: instruction, assistant: cot_answer]}
completion and chat put the instruction (documents + question) in the prompt: the model has to see the
documents it is meant to reason over (the reference formatters used the bare question).
"""
import argparse
import io
import itertools
import json
import os
import queue
import sys
import threading
from pathlib import Path
from typing import Iterable, Iterator, Optional

import orjson

FORMATS = ("hf", "completion", "chat")
TYPES = ("jsonl", "parquet")
REQUIRED_FIELDS = ("instruction", "cot_answer")


def to_format(record: dict, output_format: str, system_prompt: str = "") -> dict:
    if output_format == "hf":
        return record
    if output_format == "completion":
        return {"prompt": record["instruction"], "completion": record["cot_answer"]}
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": "user", "content": record["instruction"]},
                 {"role": "assistant", "content": record["cot_answer"]}]
    return {"messages": messages}


def output_file(path: str, output_type: str) -> Path:
    """--output may be given with or without its extension."""
    path = Path(path)
    return path if path.suffix == f".{output_type}" else path.with_name(path.name + f".{output_type}")


# The fields raft.py writes (design.md, section 2) and their Arrow types, so that records can be written in batches
# (a batch of refusal examples alone would leave quotes_verified without a type).
RAFT_FIELDS = ("id", "type", "question", "context", "oracle_context", "cot_answer", "instruction", "source",
               "oracle_present", "quotes_verified", "oracle_rank")
BATCH = 1000        # records per Parquet or Arrow batch: memory stays flat, whatever the number of records


def raft_arrow_schema():
    import pyarrow as pa
    text, nested = pa.string(), pa.list_(pa.list_(pa.string()))
    return pa.schema([("id", text), ("type", text), ("question", text),
                      ("context", pa.struct([("title", nested), ("sentences", nested)])),
                      ("oracle_context", text), ("cot_answer", text), ("instruction", text), ("source", text),
                      ("oracle_present", pa.bool_()), ("quotes_verified", pa.bool_()), ("oracle_rank", pa.int64())])


def discard_in_background(path: Path):
    """Remove an earlier run's output file as a new run starts, on another thread: freeing a gigabyte file takes
    the file system most of a second, which the run need not wait for. (The run rewrites that output from its
    first record, so the old file could not be kept anyway.)"""
    if path.exists():
        doomed = path.with_name(f".{path.name}.old")
        os.replace(path, doomed)
        threading.Thread(target=doomed.unlink, kwargs={"missing_ok": True}, name="remove-old-output").start()


class DatasetWriter:
    """A Hugging Face dataset folder of RAFT records, the layout Dataset.save_to_disk writes and
    datasets.load_from_disk reads (an Arrow stream file, dataset_info.json, state.json), written batch by batch as
    the records come: memory does not grow with them, and no copy of the data is mapped back into memory."""
    DATA_FILE = "data-00000-of-00001.arrow"

    def __init__(self, folder: Path):
        import pyarrow as pa
        self.folder, self.schema = Path(folder), raft_arrow_schema()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "state.json").unlink(missing_ok=True)      # the folder is not a dataset until closed
        discard_in_background(self.folder / self.DATA_FILE)
        self.sink = pa.OSFile(str(self.folder / self.DATA_FILE), "wb")
        self.writer = pa.ipc.new_stream(self.sink, self.schema)

    def add_json_lines(self, lines: bytes):
        """A batch of records given as JSON lines: pyarrow's C++ reader parses them without holding the GIL."""
        import pyarrow.json as pa_json
        table = pa_json.read_json(
            io.BytesIO(lines),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=len(lines) + 1),   # one block: any line fits
            parse_options=pa_json.ParseOptions(explicit_schema=self.schema, unexpected_field_behavior="error"))
        self.writer.write_table(table.select(self.schema.names).cast(self.schema))

    def close(self):
        import datasets
        self.writer.close()
        self.sink.close()
        features = datasets.Features.from_arrow_schema(self.schema)
        datasets.DatasetInfo(features=features).write_to_directory(str(self.folder))
        size = (self.folder / self.DATA_FILE).stat().st_size
        state = {"_data_files": [{"filename": self.DATA_FILE}], "_fingerprint": f"{size:016x}",
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": None}
        (self.folder / "state.json").write_text(json.dumps(state, indent=2))


class RecordSink:
    """raft.py's records as they are assembled: JSON lines in `stream` and the Hugging Face dataset in `folder`.
    The caller encodes each record once; a background thread writes the lines and turns them into Arrow, both
    outside the GIL, so the writing of one batch runs on another core while the caller assembles the next. The
    queue holds two batches at most: memory stays flat. A failure of the writer (a full disk) is raised in the
    caller at its next add() or at close()."""

    def __init__(self, stream: Path, folder: Path):
        self.file = open(stream, "wb")
        self.dataset = DatasetWriter(folder)
        self.lines: list[bytes] = []
        self.batches: queue.Queue = queue.Queue(maxsize=2)
        self.failure: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._write_batches, name="record-writer", daemon=True)
        self.thread.start()

    def add(self, record: dict):
        # orjson: ten times json.dumps's speed on these records (about 10 KB each, a gigabyte at 100K records).
        self.lines.append(orjson.dumps(record))
        if len(self.lines) >= BATCH:
            self._hand_over()

    def close(self):
        """Write what is left and finish the dataset folder; raises the writer's failure, if any. (A run stopped
        before this leaves the folder without state.json, so that nothing takes it for a finished dataset.)"""
        try:
            self._hand_over()
            self._put(None)
        finally:
            self.thread.join()      # it has ended: at the None, or at its failure
            self.file.close()
        if self.failure:            # met after the last batch was handed over
            raise self.failure
        self.dataset.close()

    def _hand_over(self):
        if self.lines:
            batch, self.lines = b"\n".join(self.lines) + b"\n", []
            self._put(batch)

    def _put(self, batch: Optional[bytes]):
        while True:
            if self.failure:
                raise self.failure
            try:
                self.batches.put(batch, timeout=0.5)
                return
            except queue.Full:      # the writer is busy, or died: look again
                continue

    def _write_batches(self):
        try:
            while (batch := self.batches.get()) is not None:
                self.file.write(batch)
                self.dataset.add_json_lines(batch)
        except BaseException as e:      # handed to the caller; the thread ends
            self.failure = e


def write(records: Iterable[dict], path: str, output_format: str = "hf", output_type: str = "jsonl",
          system_prompt: str = "") -> Path:
    """Write converted records, streaming (a list or any iterable; only Parquet output of records with other
    fields than raft.py's is collected first). JSONL is written line by line, so the same records give the same
    bytes."""
    target = output_file(path, output_type)
    target.parent.mkdir(parents=True, exist_ok=True)
    rows = (to_format(r, output_format, system_prompt) for r in records)
    if output_type == "jsonl":
        with open(target, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    else:
        _write_parquet(rows, target, output_format)
    return target


def _write_parquet(rows: Iterator[dict], target: Path, output_format: str):
    import pyarrow as pa
    import pyarrow.parquet as pq
    first = list(itertools.islice(rows, BATCH))
    if output_format == "hf" and first and all(tuple(r) == RAFT_FIELDS for r in first):
        schema = raft_arrow_schema()
    else:
        first += list(rows)             # other fields: their types are read off every record
        schema = pa.Table.from_pylist(first).schema
    with pq.ParquetWriter(target, schema) as writer:
        batch = first
        while batch:
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
            batch = list(itertools.islice(rows, BATCH))


def iter_jsonl(path: str) -> Iterator[dict]:
    """The records of a JSONL file one at a time (for Dataset.from_generator)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def read(path: str, input_type: str = "jsonl") -> list[dict]:
    """RAFT records from a save_to_disk folder (arrow) or a JSONL file; a ValueError naming the file, line and
    problem on bad input. raft_eval.py (eval drafts) and the trainer read raft.jsonl through here too."""
    if not Path(path).exists():
        raise ValueError(f"{path} not found: pass a RAFT dataset written by raft.py")
    if input_type == "arrow":
        import datasets
        try:
            records = datasets.load_from_disk(path).to_list()
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"input {path} is not a dataset folder written by save_to_disk ({e})") from None
        for number, record in enumerate(records, 1):
            _check_fields(record, f"{path}, record {number}")
    else:
        records = _read_jsonl(path)
    if not records:
        raise ValueError(f"{path} is empty: it holds no RAFT records")
    return records


def _read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}, line {number}: not valid JSON") from None
            _check_fields(record, f"{path}, line {number}")
            records.append(record)
    return records


def _check_fields(record, where: str):
    missing = [k for k in REQUIRED_FIELDS if not isinstance(record, dict) or not isinstance(record.get(k), str)]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}: not a RAFT record (see design.md, section 2)")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a RAFT dataset to another format.")
    parser.add_argument("--input", required=True, help="dataset folder (arrow) or JSONL file")
    parser.add_argument("--input-type", choices=("arrow", "jsonl"), default="arrow")
    parser.add_argument("--output", required=True, help="output file; the extension is added if missing")
    parser.add_argument("--output-format", choices=FORMATS, default="hf")
    parser.add_argument("--output-type", choices=TYPES, default="jsonl")
    parser.add_argument("--output-chat-system-prompt", default="", help="system message of the chat format")
    args = parser.parse_args(argv)
    try:
        records = read(args.input, args.input_type)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    target = write(records, args.output, args.output_format, args.output_type, args.output_chat_system_prompt)
    print(f"wrote {len(records)} records to {target} ({args.output_format}, {args.output_type})")


if __name__ == "__main__":
    main()
