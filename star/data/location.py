"""Where a shard folder lives: a local folder, or a remote prefix the user typed on the command line.

    shards/in256                                a local folder
    https://host/in256  gs://bucket/in256       read with WebDataset's gopen (curl, gsutil)
    s3://bucket/in256                           read through `aws s3 cp URL -`
    "pipe:aws s3 cp s3://bucket/in256/{} -"     any command; {} is replaced by the (quoted) file name

The manifest and every shard are found under that root by their plain file names. A name is only ever what
the manifest lists, and a manifest is data, not a command: names are checked to be plain file names before
anything opens them, so a crafted manifest cannot reach outside its folder or run a program. The only URL or
command ever opened is the one the user gave.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

REMOTE_PREFIXES = ("http://", "https://", "gs://", "s3://")
PIPE = "pipe:"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_plain_name(name: object, what: str) -> str:
    """`name` if it is a plain file name (letters, digits, '_', '.', '-'; no folder, no '..', no scheme)."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a plain file name inside the shard folder (no '/', '..', "
                         "scheme or command): the manifest is damaged or was not written by tokenize/run.py")
    return name


@dataclass(frozen=True)
class ShardLocation:
    root: str

    @property
    def is_remote(self) -> bool:
        return self.root.startswith(REMOTE_PREFIXES + (PIPE,))

    @property
    def folder(self) -> Path:
        """The local folder (a remote location has none)."""
        if self.is_remote:
            raise ValueError(f"{self.root} is remote: it has no local folder (the token cache needs --cache-dir)")
        return Path(self.root)

    def url(self, name: str) -> str:
        """What WebDataset (or `open`) opens for the file `name` under this root."""
        name = check_plain_name(name, "file")
        if not self.is_remote:
            return str(Path(self.root) / name)
        if self.root.startswith(PIPE):
            if "{}" not in self.root:
                raise ValueError(f"--shards {self.root}: a pipe: location needs {{}} where the file name goes")
            return self.root.replace("{}", shlex.quote(name))
        url = self.root.rstrip("/") + "/" + name
        if url.startswith("s3://"):
            return f"{PIPE}aws s3 cp {shlex.quote(url)} -"
        return url

    def open(self, name: str) -> BinaryIO:
        if not self.is_remote:
            return open(self.url(name), "rb")
        from webdataset.gopen import gopen

        return gopen(self.url(name), "rb")

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as stream:
            return stream.read()

    def exists(self, name: str) -> bool:
        """Locally, whether the file exists; remotely, whether it can be opened and read (the manifest only)."""
        if not self.is_remote:
            return Path(self.url(name)).is_file()
        try:
            self.read_bytes(name)
        except (OSError, ValueError):
            return False
        return True

    def __str__(self) -> str:
        return self.root
