"""What a worker answers to audits: the window of versions it keeps, and its state at a version asked.

Legend: none (named tensors of any shape).
"""

from __future__ import annotations

from experts.commitments import AuditRefused, answer_audit
from experts.owner import ExpertOwner
from experts.remote.settings import RequestError
from experts.remote.wire import Kind, Message, expert_state_message

MAX_AUDIT_WINDOW = 64  # versions an owner keeps for audits at most, whatever it is asked


def audit_window(asked: object) -> int:
    """The window a HOST or KEEP_STATES asks for, within this worker's bound."""
    if not isinstance(asked, int) or isinstance(asked, bool) or not 0 <= asked <= MAX_AUDIT_WINDOW:
        raise RequestError(f"audit window {str(asked)[:20]} is not an integer in 0..{MAX_AUDIT_WINDOW}")
    return asked


def audit_reply(owner: ExpertOwner, message: Message) -> Message:
    """AUDIT_STATE for an AUDIT of `owner`: its parameters and optimizer state at the version asked, and
    the version (and parameter sketch) it committed to next; `RequestError` when it is not kept."""
    version = message.meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RequestError(f"AUDIT needs an integer version, got {str(version)[:20]}")
    try:
        answer = answer_audit(owner.trail, version)
    except AuditRefused as refusal:
        raise RequestError(f"audit refused: {refusal}") from None
    params = {name: t.cpu() for name, t in answer.state.params.items()}
    next_sketch = None if answer.next_sketch_P is None else answer.next_sketch_P.tolist()
    meta = {"version": version, "next_version": answer.next_version, "next_sketch": next_sketch}
    address = {"step": message.step, "layer": message.layer, "expert": message.expert}
    return expert_state_message(Kind.AUDIT_STATE, params, answer.state.optimizer, meta=meta, **address)
