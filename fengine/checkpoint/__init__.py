"""Checkpoints: one ``.safetensors`` file per `TrainState`, written atomically, verified on load.

Format (version 1). A checkpoint is a plain safetensors file, so
``safetensors.torch.load_file(path)`` reads it:

* every tensor of the state is stored under its pytree path, components joined
  by ``/``: ``params/fc1.weight``, ``opt_state/1/exp_avg/fc1.weight``,
  ``extra/amp/scale`` (a ``/`` or ``%`` inside a key is written ``%2F`` / ``%25``);
* the safetensors metadata (string -> string, values here are JSON) holds
  ``fengine.format`` / ``fengine.format_version`` / ``fengine.kind``
  (``train_state``, or ``params`` for `publish`), ``fengine.position`` (step,
  epoch, batch_in_epoch, seed), ``fengine.structure`` (every leaf: name, kind
  ``tensor`` / ``scalar`` / ``empty`` (an empty dict), its pytree path, and for
  tensors the device type), ``fengine.scalars`` (the non-tensor leaves: ints,
  floats, bools, None, str), ``fengine.meta`` (the caller's ``meta``, e.g. the
  resolved config), ``fengine.versions`` (fengine, torch, python),
  ``fengine.data_digest`` (CRC-32 of each 16 MiB block of the tensor data) and
  ``fengine.header_digest`` (SHA-256 of the tensor table and all other metadata).

CRC-32 was measured as the fastest stdlib digest here (zlib.crc32 3.7 GB/s;
adler32 3.1, sha1/sha256 1.1, md5 0.7, blake2b 0.5 GB/s on one core); it catches
every burst error up to 32 bits and any other damage with probability 1 - 2^-32
per block. With the optional ``isal`` package (``fengine[fast]``) the same CRC-32
is ISA-L's (7.7 vs 1.9 GB/s measured side by side here): the files are byte for
byte the same. Blocks are hashed (and read/written) on a few threads, since the
CRC and ``os.pread``/``os.pwrite`` release the GIL, in 1 MiB pieces checksummed
right next to their I/O while still in the CPU cache. The header is covered by SHA-256.

Writes are atomic: a hidden temp file in the target directory, ``fsync``,
``os.replace``, ``fsync`` of the directory. A checkpoint is never modified in
place afterwards. The ``last_checkpoint`` pointer file (MMEngine's name) is
written the same way, and only after the checkpoint it names is complete. A save
killed midway leaves at most a hidden ``.<name>.<pid>.<random>.tmp`` file, which
nothing reads.

Nothing in a file is trusted. Only regular files are opened (a FIFO, socket,
device or directory is refused, never waited on). Every header field is checked
before use (`_format`): the tensor table (dtypes, shapes, offsets tiling the data
exactly), and each fengine field's type, range and consistency with the others,
so that a file edited with its digests recomputed still raises one
`CheckpointError` naming the file and the field, never a raw ``TypeError`` or
``ZeroDivisionError``. Loading then checks the file against a template state
(``like``) and reports every missing / unexpected name and every shape / dtype
mismatch at once; the block digests are checked as the data is read, and
nothing is returned unless all of it matched.

The ``last_checkpoint`` pointer is a hint: `latest` follows it only to a regular
file inside the work dir (or the ``save_dir`` the caller names), and otherwise,
or without a pointer, warns and takes the readable checkpoint with the highest
step. `clean_stale_temps` removes the temp files of killed saves (their writer
is gone); `remove` deletes a checkpoint durably (for retention policies).

Modules: `_format` (header, metadata, digests, errors, field checks), `_data`
(tensor bytes in CRC-32 blocks), `_io` (atomic files, opening regular files,
removal, positional I/O, threads), `_tree` (leaf names), `_state` (save / load /
read_meta / latest / mark_latest / clean_stale_temps), `_params` (load_params /
publish), `_background` (snapshots of a state and the one-job writer thread behind
``Checkpointer(async_save=True)``; `fengine.loop` runs it).
"""

from fengine.checkpoint import _io
from fengine.checkpoint._format import (
    FORMAT_VERSION as FORMAT_VERSION,
    CheckpointError as CheckpointError,
    CheckpointMismatchError as CheckpointMismatchError,
)
from fengine.checkpoint._io import remove as remove
from fengine.checkpoint._params import (
    LoadReport as LoadReport,
    load_params as load_params,
    publish as publish,
)
from fengine.checkpoint._state import (
    POINTER as POINTER,
    clean_stale_temps as clean_stale_temps,
    latest as latest,
    list_checkpoints as list_checkpoints,
    load as load,
    mark_latest as mark_latest,
    pointed as pointed,
    read_meta as read_meta,
    save as save,
    set_aside_later as set_aside_later,
)


__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointMismatchError",
    "LoadReport",
    "clean_stale_temps",
    "latest",
    "list_checkpoints",
    "load",
    "load_params",
    "mark_latest",
    "pointed",
    "publish",
    "read_meta",
    "remove",
    "save",
    "set_aside_later",
]

# Every byte that save, publish and mark_latest write goes through these two, looked up here at call time,
# so tests can patch them (e.g. to simulate a full disk).
_pwrite_all = _io.pwrite_all
_preallocate = _io.preallocate
