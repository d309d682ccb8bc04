"""Audits (proof of learning): validators re-run a random sample of expert calls from the parameters
their owners committed to, replay the owners' optimizer steps, and flag copies and replays; failures
go to the ledger with their evidence (see `checks`, `auditor`, `config`)."""

from moe.incentives.audits.auditor import Auditor, FailedAudit, build_auditor
from moe.incentives.audits.config import AuditConfig, as_audit_config

__all__ = ["AuditConfig", "Auditor", "FailedAudit", "as_audit_config", "build_auditor"]
