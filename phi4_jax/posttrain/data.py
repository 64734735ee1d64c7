"""Post-training data: SFT conversations and DPO preference pairs from JSONL, encoded, checked and batched.

- SFT (`data.sft_files`): one ``{"messages": [{"role", "content"}, ...]}`` per line, encoded with
  `encode_sft_example` (loss on the assistant turns and their closing ``<|im_end|>``), then packed first-fit into
  ``train.seq_len`` rows (grain's `FirstFitPackIterDataset`): an example is never split, each gets its own
  segment id (1, 2, ...; 0 = padding) and positions restarting at 0, so examples never attend across each other.
  Batch: ``{input_ids, segment_ids, positions, loss_mask}`` [G, S] int32.
- DPO (`data.dpo_files`): one ``{"prompt": [messages], "chosen": str, "rejected": str}`` per line. The prompt is
  rendered in the chat format; if its last message is the user's (or system's), an assistant turn is opened and
  each completion is closed with ``<|im_end|>``; if it is an assistant message, that turn is left open and the
  completions continue it (no ``<|im_end|>``): the form Pivotal Token Search's pairs take. Token-level pairs
  ``{"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}`` (phi-4 ids) are taken as they are.
  `read_dpo_pairs` gives one right-padded sequence per pair and side (the reference log-probs are computed on
  those); `pack_dpo_pairs` then packs several pairs per row, first-fit: pair j of a row is segment j+1 of both its
  chosen row and its rejected row (positions restart at 0 per segment), so a pair's two sides stay in one forward
  pass and their log-probs line up slot by slot. Batch: ``{chosen,rejected}_{input_ids,segment_ids,positions,
  loss_mask}`` [G, S] int32, ``pair_mask`` [G, K] int32 (1 where slot k holds a pair) and
  ``ref_{chosen,rejected}_logps`` [G, K] float32 (`phi4_jax.posttrain.reference`; 0 in empty slots).

Every line is checked when the run starts (one pass, with a progress bar). A line that cannot be read (invalid
JSON, missing or mistyped fields, malformed messages) is an error naming ``file:line``. An item that can be
skipped is skipped, counted and reported by reason with its first locations: an example longer than the
context, a conversation without an assistant turn, a pair whose chosen equals its rejected. If nothing is left,
it is an error. The encoded examples are held in host memory (int32 ids and masks).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os

import grain
import numpy as np

from phi4_jax.data.jsonl import jsonl_objects
from phi4_jax.data.sources import DataError
from phi4_jax.posttrain.sft import SFTExampleError, encode_sft_example, turn_tokens
from phi4_jax.special_tokens import IM_END_ID


@dataclasses.dataclass
class SkipReport:
    """Items skipped while reading a dataset: {reason: [file:line, ...]}."""
    kept: int = 0
    skipped: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

    def skip(self, where: str, reason: str) -> None:
        self.skipped[reason].append(where)

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self, what: str) -> str:
        lines = [f"{what}: kept {self.kept}, skipped {self.n_skipped}"]
        for reason, places in sorted(self.skipped.items()):
            more = f" (+{len(places) - 3} more)" if len(places) > 3 else ""
            lines.append(f"  skipped {len(places)}: {reason}: {', '.join(places[:3])}{more}")
        return "\n".join(lines)


def jsonl_records(pattern: str, what: str):
    """Yields ("file:line", record dict) for every non-blank line of the files matching `pattern`; a line that is not
    a JSON object raises DataError naming it (`phi4_jax.data.jsonl.jsonl_objects`)."""
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise DataError(f"{what}: no files match {pattern!r}")
    for path in files:
        yield from jsonl_objects(path)   # a bad line raises DataError naming it


def _progress(iterable, desc: str, progress: bool):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=" lines", dynamic_ncols=True)


def _phi4(tokenizer):
    """The phi-4 `Tokenizer` behind a data tokenizer (`phi4_jax.data.tokenizing`)."""
    return tokenizer.tokenizer


def _messages(where: str, record: dict, key: str) -> list:
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{'role', 'content'}} messages")
    return messages


# ----------------------------------------------------------------------------- SFT

def read_sft_examples(pattern: str, tokenizer, seq_len: int, *, progress: bool = True):
    """([{"input_ids", "loss_mask"}] int32 in the model's ids, SkipReport) for the SFT JSONL files."""
    from phi4_jax.tokenizer import TokenizerError

    examples, report = [], SkipReport()
    for where, record in _progress(jsonl_records(pattern, "data.sft_files"), "read sft", progress):
        messages = _messages(where, record, "messages")
        try:
            ids, mask = encode_sft_example(_phi4(tokenizer), messages)
        except SFTExampleError:
            report.skip(where, "no assistant turn (nothing to train on)")
            continue
        except TokenizerError as e:
            raise DataError(f"{where}: malformed messages: {e}") from None
        if len(ids) > seq_len:
            report.skip(where, f"longer than train.seq_len {seq_len} tokens")
            continue
        examples.append({"input_ids": tokenizer.from_phi4_ids(ids), "loss_mask": mask})
    report.kept = len(examples)
    if not examples:
        raise DataError(f"data.sft_files {pattern!r}: no usable example\n{report.summary('sft data')}")
    return examples, report


class _PackedToBatch(grain.transforms.Map):
    def map(self, element):
        return {"input_ids": element["input_ids"].astype(np.int32),
                "segment_ids": element["input_ids_segment_ids"].astype(np.int32),
                "positions": element["input_ids_positions"].astype(np.int32),
                "loss_mask": element["loss_mask"].astype(np.int32)}


def _host_share(ds: grain.MapDataset, what: str, process_index: int, process_count: int) -> grain.MapDataset:
    if process_count > 1:
        if len(ds) < process_count:
            raise DataError(f"{what} has {len(ds)} items, fewer than the {process_count} hosts")
        ds = ds[process_index::process_count]
    return ds


def sft_batches(examples, seq_len: int, host_batch: int, *, seed: int = 0, process_index: int = 0,
                process_count: int = 1) -> grain.IterDataset:
    """Packed SFT batches {input_ids, segment_ids, positions, loss_mask} [host_batch, seq_len] int32, from
    `read_sft_examples`' examples (shuffled each epoch, this host's share, first-fit packed)."""
    ds = grain.MapDataset.source(examples).shuffle(seed=seed)
    ds = _host_share(ds, "the SFT data", process_index, process_count).repeat(None)
    packed = grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(), length_struct={"input_ids": seq_len, "loss_mask": seq_len},
        num_packing_bins=max(host_batch, 2), seed=seed)
    return packed.map(_PackedToBatch()).batch(host_batch, drop_remainder=True)


# ----------------------------------------------------------------------------- DPO

def _token_list(where: str, record: dict, key: str, vocab: int) -> list[int]:
    value = record[key]
    if not (isinstance(value, list) and all(isinstance(t, int) and 0 <= t < vocab for t in value)):
        raise DataError(f"{where}: {key!r} must be a list of token ids in [0, {vocab})")
    return value


def encode_dpo_pair(where: str, record: dict, phi4_tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) phi-4 ids of one DPO record (see the module docstring for the two forms)."""
    from phi4_jax.tokenizer import TokenizerError

    if "prompt_ids" in record:
        vocab = phi4_tokenizer.n_vocab
        return tuple(_token_list(where, record, k, vocab) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str):
            raise DataError(f"{where}: {key!r} must be a string (the assistant's completion)")
    messages = _messages(where, record, "prompt")
    try:
        phi4_tokenizer.apply_chat_template(messages)   # the template's checks: roles, keys, content types
    except TokenizerError as e:
        raise DataError(f"{where}: malformed prompt messages: {e}") from None
    open_turn = messages[-1]["role"] == "assistant"
    prompt: list[int] = []
    for i, message in enumerate(messages):
        header, body = turn_tokens(phi4_tokenizer, message, close=not (open_turn and i == len(messages) - 1))
        prompt += header + body
    if not open_turn:
        prompt += turn_tokens(phi4_tokenizer, {"role": "assistant", "content": ""})[0]
    close = [] if open_turn else [IM_END_ID]
    return (prompt, phi4_tokenizer.encode_ordinary(record["chosen"]) + close,
            phi4_tokenizer.encode_ordinary(record["rejected"]) + close)


def _padded(prompt, completion, seq_len):
    n = len(prompt) + len(completion)
    ids = np.zeros(seq_len, np.int32)
    ids[:n] = np.concatenate([prompt, completion])
    mask = np.zeros(seq_len, np.int32)
    mask[len(prompt):n] = 1
    return ids, (np.arange(seq_len) < n).astype(np.int32), mask


def read_dpo_pairs(pattern: str, tokenizer, seq_len: int, *, progress: bool = True):
    """(pairs, SkipReport): pairs is a dict of stacked arrays {chosen,rejected}_{input_ids,segment_ids,loss_mask}
    [N, seq_len] int32 in the model's ids, one right-padded sequence (prompt + completion) per row."""
    phi4 = _phi4(tokenizer)
    rows, report = [], SkipReport()
    for where, record in _progress(jsonl_records(pattern, "data.dpo_files"), "read dpo", progress):
        prompt, chosen, rejected = encode_dpo_pair(where, record, phi4)
        if chosen == rejected:
            report.skip(where, "chosen equals rejected (no preference)")
            continue
        if not chosen or not rejected:
            report.skip(where, "empty chosen or rejected completion")
            continue
        if len(prompt) + max(len(chosen), len(rejected)) > seq_len:
            report.skip(where, f"prompt + completion longer than train.seq_len {seq_len} tokens")
            continue
        prompt = tokenizer.from_phi4_ids(prompt)
        row = {}
        for side, completion in (("chosen", chosen), ("rejected", rejected)):
            ids, seg, mask = _padded(prompt, tokenizer.from_phi4_ids(completion), seq_len)
            row.update({f"{side}_input_ids": ids, f"{side}_segment_ids": seg, f"{side}_loss_mask": mask})
        rows.append(row)
    report.kept = len(rows)
    if not rows:
        raise DataError(f"data.dpo_files {pattern!r}: no usable pair\n{report.summary('dpo data')}")
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, report


DPO_SIDES = ("chosen", "rejected")


def pack_dpo_pairs(pairs: dict, *, slot_multiple: int = 1) -> dict:
    """`read_dpo_pairs`' one-pair-per-row arrays packed first-fit (in data order) into rows of the same length:
    {side}_{input_ids,segment_ids,positions,loss_mask} [R, S] int32 and ``pair_index`` [R, K] int32 (the pair in
    each slot, -1 = empty; K = the most pairs in a row, rounded up to `slot_multiple`). Pair `pair_index[r, k]` is
    segment k+1 of both `chosen` row r and `rejected` row r."""
    seq_len = pairs["chosen_input_ids"].shape[1]
    lengths = {side: pairs[f"{side}_segment_ids"].sum(1) for side in DPO_SIDES}
    rows: list[list[int]] = []       # pair indices per row
    fill: list[dict] = []            # tokens used per row and side
    for i in range(len(lengths["chosen"])):
        need = {side: int(lengths[side][i]) for side in DPO_SIDES}
        for r, used in enumerate(fill):
            if all(used[side] + need[side] <= seq_len for side in DPO_SIDES):
                break
        else:
            r = len(rows)
            rows.append([])
            fill.append(dict.fromkeys(DPO_SIDES, 0))
        rows[r].append(i)
        for side in DPO_SIDES:
            fill[r][side] += need[side]
    k = -(-max(map(len, rows)) // slot_multiple) * slot_multiple
    out = {f"{side}_{name}": np.zeros((len(rows), seq_len), np.int32) for side in DPO_SIDES
           for name in ("input_ids", "segment_ids", "positions", "loss_mask")}
    out["pair_index"] = np.full((len(rows), k), -1, np.int32)
    for r, members in enumerate(rows):
        out["pair_index"][r, :len(members)] = members
        for side in DPO_SIDES:
            at = 0
            for slot, i in enumerate(members):
                n = int(lengths[side][i])
                out[f"{side}_input_ids"][r, at:at + n] = pairs[f"{side}_input_ids"][i, :n]
                out[f"{side}_loss_mask"][r, at:at + n] = pairs[f"{side}_loss_mask"][i, :n]
                out[f"{side}_segment_ids"][r, at:at + n] = slot + 1
                out[f"{side}_positions"][r, at:at + n] = np.arange(n)
                at += n
    return out


def packed_ref_logps(packed: dict, ref_logps: dict) -> dict:
    """{"ref_chosen_logps", "ref_rejected_logps"} [R, K] float32 and ``pair_mask`` [R, K] int32: each slot's
    reference log-probs (from the per-pair [N] arrays), 0 in empty slots."""
    index = packed["pair_index"]
    valid = index >= 0
    out = {k: np.where(valid, np.asarray(v, np.float32)[np.maximum(index, 0)], np.float32(0))
           for k, v in ref_logps.items()}
    return {**out, "pair_mask": valid.astype(np.int32)}


def dpo_batches(pairs: dict, ref_logps: dict, host_batch: int, *, seed: int = 0, process_index: int = 0,
                process_count: int = 1, slot_multiple: int = 1) -> grain.IterDataset:
    """DPO batches of `host_batch` packed rows (`pack_dpo_pairs` of `read_dpo_pairs`' pairs) with their reference
    log-probs ({"ref_chosen_logps", "ref_rejected_logps"} [N] float32 per pair), rows shuffled each epoch, this
    host's share. `slot_multiple`: K (pair slots per row) is a multiple of it (the mesh's sequence axis size)."""
    packed = pack_dpo_pairs(pairs, slot_multiple=slot_multiple)
    table = {k: v for k, v in packed.items() if k != "pair_index"}
    table.update(packed_ref_logps(packed, ref_logps))
    ds = grain.MapDataset.range(len(packed["pair_index"])).shuffle(seed=seed)
    ds = _host_share(ds, "the packed DPO rows", process_index, process_count).repeat(None)
    return ds.map(lambda i: {k: v[i] for k, v in table.items()}).to_iter_dataset().batch(
        host_batch, drop_remainder=True)

