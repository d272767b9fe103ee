"""The journal of one mailbox move: its steps, written before each is taken."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from delivery.layout import MailboxLayout

STEPS = ("start", "copied", "frozen", "synced", "flipped", "unfrozen")
TRASH_SUFFIX = " pwmove-old"  # `<user> pwmove-old`: no user name holds a space


@dataclasses.dataclass
class Journal:
    user: str
    src: str
    dst: str
    src_root: str
    dst_root: str
    scheme: str
    step: str = "start"
    started: float = 0.0
    manifest: list[str] | None = None  # message keys in the mirror at `synced`

    @classmethod
    def load(cls, path: pathlib.Path) -> Journal:
        return cls(**json.loads(path.read_text()))

    def src_box(self) -> pathlib.Path:
        return MailboxLayout(self.src_root, self.scheme).path(self.user)

    def dst_box(self) -> pathlib.Path:
        return MailboxLayout(self.dst_root, self.scheme).path(self.user)

    def trash(self) -> pathlib.Path:
        box = self.src_box()
        return box.with_name(box.name + TRASH_SUFFIX)

    def at_least(self, step: str) -> bool:
        return STEPS.index(self.step) >= STEPS.index(step)
