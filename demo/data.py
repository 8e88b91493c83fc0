"""The demo task data: route a support message to one of 8 queues, plus tool-use examples.

Train and eval use disjoint message templates, so the eval split measures generalisation to new
phrasings; the keywords are shared, and the base model learns them (without the task format) from
"world knowledge" sentences in pretraining, as a real pretrained model would know them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SEED = 1234

QUEUES: dict[str, list[str]] = {
    "billing": ["invoice", "refund of a charge", "double charge", "payment card", "receipt", "subscription fee"],
    "shipping": ["delivery", "tracking number", "courier", "parcel", "late package", "shipping address"],
    "returns": ["return label", "exchange", "wrong size", "damaged item", "send it back", "return window"],
    "technical": ["error message", "app crash", "login page bug", "slow website", "api timeout", "broken button"],
    "account": ["username", "profile settings", "email change", "close my account", "account name", "preferences"],
    "security": ["password reset", "suspicious login", "two factor code", "hacked account", "phishing email",
                 "stolen card"],
    "sales": ["bulk order", "price quote", "discount for teams", "enterprise plan", "volume pricing", "demo call"],
    "feedback": ["suggestion", "compliment", "feature idea", "review", "complaint about staff", "survey"],
}

TRAIN_TEMPLATES = [
    "hi , i have a question about my {kw} .",
    "hello , can you help with the {kw} please ?",
    "there is a problem with {kw} on my side .",
    "i need help regarding {kw} today .",
    "quick question : what about my {kw} ?",
    "please look into the {kw} issue for me .",
    "my {kw} is not right , can someone check ?",
    "i am writing about {kw} again .",
    "could you sort out the {kw} ?",
    "urgent : {kw} needs attention .",
    "good morning , the {kw} thing is confusing me .",
    "who can i talk to about {kw} ?",
]

EVAL_TEMPLATES = [
    "hey team , something is off with my {kw} .",
    "i would like some support with {kw} .",
    "can anyone explain the {kw} to me ?",
    "still waiting on an answer about {kw} .",
    "regarding {kw} : please advise .",
]

ROUTING_SYSTEM_PROMPT = (
    "route the support message to one queue : " + " , ".join(QUEUES) + " . answer with the queue name only ."
)

GENERIC_SYSTEM_PROMPT = "you are a helpful support assistant ."
GENERIC_REPLIES = [
    "thanks for your message . we will get back to you soon .",
    "thank you for reaching out . an agent will reply shortly .",
    "we have received your request and will look into it .",
]

GENERIC_TEXT = [
    "the weather today is calm and the sky is clear .",
    "our team works every day to help customers .",
    "a good answer is short and clear .",
    "the store opens at nine and closes at six .",
    "customers write to us about many things .",
    "please be patient while we read every message .",
    "the office is in a quiet street near the park .",
    "support agents answer questions in the order they arrive .",
]

WORLD_TEMPLATES = [
    "the {queue} team handles {kw} .",
    "questions about {kw} go to {queue} .",
    "{kw} is a {queue} topic .",
]

CITIES = ["paris", "london", "berlin", "madrid", "rome", "tokyo", "oslo", "lisbon", "vienna", "dublin"]
PRIORITIES = ["low", "high"]
TOOL_REPEATS = 1
WORLD_REPEATS = 4

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": CITIES}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "open_ticket", "description": "open a support ticket in a queue",
        "parameters": {"type": "object", "properties": {
            "queue": {"type": "string", "enum": list(QUEUES)},
            "priority": {"type": "string", "enum": PRIORITIES}},
            "required": ["queue", "priority"]}}},
]

# Several phrasings per tool, so the fine-tune learns "city -> get_weather(city)" rather than the sentences;
# the eval phrasing is held out. With three and two phrasings the tuned demo model scored 0 on it.
WEATHER_TEMPLATES_TRAIN = ["what is the weather in {city} ?", "is it raining in {city} now ?",
                           "tell me the weather for {city} .", "how is the weather in {city} today ?",
                           "is it sunny in {city} ?", "will it be cold in {city} tomorrow ?",
                           "what is the temperature in {city} right now ?", "weather for {city} , please ."]
WEATHER_TEMPLATES_EVAL = ["how warm is it in {city} today ?"]
TICKET_TEMPLATES_TRAIN = ["open a {priority} priority ticket for {queue} .",
                          "please file a {queue} ticket , priority {priority} .",
                          "new ticket : {queue} , {priority} priority .",
                          "raise a ticket with {queue} , it is {priority} priority .",
                          "log a {priority} priority issue in the {queue} queue .",
                          "i want a ticket in {queue} at {priority} priority ."]
TICKET_TEMPLATES_EVAL = ["create a ticket in {queue} with {priority} priority ."]


def _routing_rows(templates: list[str], split: str) -> list[dict[str, str]]:
    rows = []
    for t_i, template in enumerate(templates):
        for queue, kws in QUEUES.items():
            for k_i, kw in enumerate(kws):
                rows.append({"id": f"{split}-{t_i:02d}-{queue}-{k_i}", "message": template.format(kw=kw),
                             "queue": queue})
    return rows


def routing_rows(split: str) -> list[dict[str, str]]:
    """Rows {id, message, queue}; `train` and `eval` share no message."""
    if split == "train":
        return _routing_rows(TRAIN_TEMPLATES, "train")
    if split == "eval":
        return _routing_rows(EVAL_TEMPLATES, "eval")
    raise ValueError(f"split={split!r} is invalid: use 'train' or 'eval'")


def routing_chat(row: dict[str, str]) -> dict[str, Any]:
    """A routing row in chat format, as fine-tuning reads it."""
    return {"id": row["id"], "messages": [
        {"role": "system", "content": ROUTING_SYSTEM_PROMPT},
        {"role": "user", "content": row["message"]},
        {"role": "assistant", "content": row["queue"]},
    ]}


def tool_rows(split: str) -> list[dict[str, Any]]:
    """Tool-use examples: a request that should call a named function with arguments."""
    if split == "pretrain":  # what the base model saw: fewer phrasings than the fine-tune data
        weather, ticket, split = WEATHER_TEMPLATES_TRAIN[:3], TICKET_TEMPLATES_TRAIN[:2], "train"
    else:
        weather = WEATHER_TEMPLATES_TRAIN if split == "train" else WEATHER_TEMPLATES_EVAL
        ticket = TICKET_TEMPLATES_TRAIN if split == "train" else TICKET_TEMPLATES_EVAL
    rows: list[dict[str, Any]] = []
    for t_i, t in enumerate(weather):
        for city in CITIES:
            rows.append({"id": f"{split}-weather-{t_i}-{city}", "message": t.format(city=city),
                         "tool": "get_weather", "arguments": {"city": city}})
    for t_i, t in enumerate(ticket):
        for queue in QUEUES:
            for priority in PRIORITIES:
                rows.append({"id": f"{split}-ticket-{t_i}-{queue}-{priority}",
                             "message": t.format(queue=queue, priority=priority),
                             "tool": "open_ticket", "arguments": {"queue": queue, "priority": priority}})
    return rows


def tool_chat(row: dict[str, Any]) -> dict[str, Any]:
    call = {"type": "function", "function": {"name": row["tool"], "arguments": row["arguments"]}}
    return {"id": row["id"], "tools": TOOLS, "messages": [
        {"role": "user", "content": row["message"]},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]}


def pretraining_documents(rng: random.Random) -> Iterator[tuple[str, Any]]:
    """(kind, payload) pairs: chats render through the chat template, text is used as is."""
    for row in routing_rows("train"):
        yield "chat", {"messages": [
            {"role": "system", "content": GENERIC_SYSTEM_PROMPT},
            {"role": "user", "content": row["message"]},
            {"role": "assistant", "content": rng.choice(GENERIC_REPLIES)},
        ]}
    # The base must "know" keyword -> queue, as a real pretrained model knows its world: repeat these.
    for _ in range(WORLD_REPEATS):
        for queue, kws in QUEUES.items():
            for kw in kws:
                for t in WORLD_TEMPLATES:
                    yield "text", t.format(queue=queue, kw=kw)
    for line in GENERIC_TEXT:
        yield "text", line
    # Tool calls are a strict format with arguments to pick from the request: show them more often.
    for _ in range(TOOL_REPEATS):
        for row in tool_rows("pretrain"):
            yield "chat", tool_chat(row)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def write_task_data(data_dir: Path) -> dict[str, Path]:
    """Writes train.jsonl (chat), eval.jsonl (rows), tools_train/eval.jsonl; returns their paths."""
    paths = {
        "train": data_dir / "train.jsonl",
        "eval": data_dir / "eval.jsonl",
        "tools_train": data_dir / "tools_train.jsonl",
        "tools_eval": data_dir / "tools_eval.jsonl",
    }
    write_jsonl(paths["train"], [routing_chat(r) for r in routing_rows("train")])
    write_jsonl(paths["eval"], routing_rows("eval"))
    write_jsonl(paths["tools_train"], [tool_chat(r) for r in tool_rows("train")])
    write_jsonl(paths["tools_eval"], tool_rows("eval"))
    return paths
