"""Applies automations.yaml (the alerts) to the Prefect server in PREFECT_API_URL, idempotently.

`python -m flows.alerts apply [--wait S]`: writes the default webhook block from LLMHOST_ALERT_WEBHOOK_URL, then
creates each automation, or updates the one of the same name in place.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import yaml
from prefect.client.orchestration import PrefectClient, get_client
from prefect.events.schemas.automations import AutomationCore
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from tasks.core.errors import ConfigError
from tasks.core.settings import PROJECT_ROOT, get_settings

AUTOMATIONS_FILE = PROJECT_ROOT / "automations.yaml"
WEBHOOK_BLOCK = "custom-webhook/llmhost-alerts"
# `text` makes the same body an incoming-webhook message for Slack, Mattermost and Rocket.Chat; a receiver of
# its own reads `subject` and `body`.
WEBHOOK_JSON = {"text": "{{subject}}\n{{body}}", "subject": "{{subject}}", "body": "{{body}}", "source": "llmhost"}


def load_automations(path: Path = AUTOMATIONS_FILE) -> list[dict[str, Any]]:
    """The automations of the file, as written (each send-notification action still names its `block`)."""
    data = yaml.safe_load(path.read_text())
    items = data.get("automations") if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(a, dict) and a.get("name") for a in items):
        raise ConfigError("automations", str(path), "give a list `automations:` of mappings, each with a `name`")
    return items


def blocks_named(automations: list[dict[str, Any]]) -> set[str]:
    """The `SLUG/NAME` block references of the automations' actions."""
    return {a["block"] for auto in automations for a in auto.get("actions", []) if "block" in a}


async def save_webhook_block(url: str, client: PrefectClient) -> UUID:
    """The default notification block (a custom webhook POSTing JSON to `url`), written over any older one."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    slug, _, name = WEBHOOK_BLOCK.partition("/")
    block = CustomWebhookNotificationBlock(name=name, url=url, method="POST", json_data=WEBHOOK_JSON, headers=None,
                                           cookies=None)
    return await block.asave(name, overwrite=True, client=client)


async def _block_id(ref: str, client: PrefectClient) -> UUID | None:
    slug, _, name = ref.partition("/")
    if not slug or not name:
        raise ConfigError("block", ref, "name a notification block as BLOCK-TYPE-SLUG/NAME, e.g. " + WEBHOOK_BLOCK)
    try:
        return (await client.read_block_document_by_name(name=name, block_type_slug=slug)).id
    except ObjectNotFound:
        return None


def _resolved(automation: dict[str, Any], ids: dict[str, UUID]) -> AutomationCore:
    data = dict(automation)
    data["actions"] = [
        {**{k: v for k, v in a.items() if k != "block"}, "block_document_id": str(ids[a["block"]])}
        if "block" in a else a
        for a in automation.get("actions", [])
    ]
    return AutomationCore.model_validate(data)


async def apply(path: Path = AUTOMATIONS_FILE, *, webhook_url: str | None = None) -> list[str]:
    """Write the webhook block (when a URL is given) and upsert every automation; returns one line per change.

    An automation whose notification block does not exist is left out, and its line says how to add the block.
    """
    automations = load_automations(path)
    lines: list[str] = []
    async with get_client() as client:
        if webhook_url:
            await save_webhook_block(webhook_url, client)
            lines.append(f"block {WEBHOOK_BLOCK}: POST {webhook_url}")
        ids: dict[str, UUID] = {}
        for ref in sorted(blocks_named(automations)):
            found = await _block_id(ref, client)
            if found is not None:
                ids[ref] = found
        for automation in automations:
            name = automation["name"]
            missing = sorted(blocks_named([automation]) - set(ids))
            if missing:
                lines.append(f"skipped {name!r}: no notification block {', '.join(missing)}; set "
                             "LLMHOST_ALERT_WEBHOOK_URL, or create the block (README.md, \"Alerts\")")
                continue
            core = _resolved(automation, ids)
            existing = await client.read_automations_by_name(name)
            if existing:
                await client.update_automation(existing[0].id, core)
                for extra in existing[1:]:  # left by an older, non-idempotent `prefect automation create`
                    await client.delete_automation(extra.id)
                lines.append(f"updated {name!r} ({existing[0].id})")
            else:
                lines.append(f"created {name!r} ({await client.create_automation(core)})")
    return lines


def wait_for_server(timeout_s: float) -> None:
    """Poll the API's /health until it answers (the server may still be starting)."""
    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError("PREFECT_API_URL", "unset", "point it at the server, e.g. http://127.0.0.1:4200/api")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ConfigError("PREFECT_API_URL", url, f"no Prefect server answered within {timeout_s:.0f}s")
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.alerts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ap = sub.add_parser("apply", help="create or update the automations of automations.yaml")
    ap.add_argument("--file", type=Path, default=AUTOMATIONS_FILE)
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the server to answer first")
    args = parser.parse_args(argv)
    try:
        if args.wait:
            wait_for_server(args.wait)
        lines = asyncio.run(apply(args.file, webhook_url=get_settings().alert_webhook_url))
    except ConfigError as exc:
        print(f"alerts: {exc}", file=sys.stderr)
        return 2
    for line in lines:
        print(f"alerts: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
