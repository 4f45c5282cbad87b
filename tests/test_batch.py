"""Several sequences in one forward pass (model.cpu.forward_batch, Model._eval_batch) against each
sequence evaluated alone: batching must change no logit, whatever the mix of prompt chunks and
decode tokens, and each sequence must see only its own KV slot."""
import numpy as np

import numba_apr

from conftest import SHARED

TINY = SHARED / "models" / "tiny-qwen2-q4km.gguf"


def _alone(model, seqs):
    """Per sequence: the logits after each of its tokens, evaluated one sequence at a time in slot 0."""
    out = []
    for ids in seqs:
        rows = [model._eval_batch(np.array([t], np.int32), np.zeros(1, np.int64), np.array([p], np.int64),
                                  np.zeros(1, np.int64))[0].copy() for p, t in enumerate(ids)]
        out.append(np.stack(rows))
    return out


def test_batch_changes_no_logit():
    model = numba_apr.load(TINY, n_ctx=64, n_seq=3)
    rng = np.random.default_rng()
    seqs = [rng.integers(0, model.config.n_vocab, n).astype(np.int32) for n in (9, 14, 5)]
    want = _alone(model, seqs)
    # Interleaved: each step takes a random-length chunk of every unfinished sequence (prompt
    # chunks and single decode tokens mixed; sequences 0, 1, 2 in slots 2, 0, 1) and asks for the
    # logits after each chunk's last token, as the server's scheduler does.
    slot_of, done, checked = [2, 0, 1], [0, 0, 0], 0
    while any(d < len(s) for d, s in zip(done, seqs)):
        tokens, slots, pos, rows, owners = [], [], [], [], []
        for i, s in enumerate(seqs):
            if done[i] == len(s):
                continue
            chunk = s[done[i]:done[i] + int(rng.integers(1, 5))]
            tokens += list(chunk)
            slots += [slot_of[i]] * len(chunk)
            pos += range(done[i], done[i] + len(chunk))
            done[i] += len(chunk)
            rows.append(len(tokens) - 1)
            owners.append((i, done[i] - 1))
        logits = model._eval_batch(np.array(tokens, np.int32), np.array(slots, np.int64),
                                   np.array(pos, np.int64), np.array(rows, np.int64))
        for row, (i, p) in zip(logits, owners):
            np.testing.assert_array_equal(row, want[i][p])
            checked += 1
    assert checked >= 3
