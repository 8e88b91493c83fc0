"""Copy-paste client snippets for an endpoint: OpenAI Python SDK, curl and the OpenAI JS SDK.

The key is read from the environment in every snippet: the dashboard never has, and never shows, a raw key.
"""

from __future__ import annotations

import json

KEY_ENV = "LLMHOST_API_KEY"


def snippets(base_url: str, model: str, *, example: str = "Hello!") -> dict[str, str]:
    """{'python', 'curl', 'javascript'} for calling `model` at `base_url` (which ends in /v1)."""
    msg = json.dumps(example)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": example}], "max_tokens": 64})
    python = f'''import os
from openai import OpenAI

client = OpenAI(base_url="{base_url}", api_key=os.environ["{KEY_ENV}"])
resp = client.chat.completions.create(
    model="{model}",
    messages=[{{"role": "user", "content": {msg}}}],
    max_tokens=64,
)
print(resp.choices[0].message.content)'''
    quoted = "'" + body.replace("'", "'\\''") + "'"  # one shell word, whatever the example says
    curl = f"""curl {base_url}/chat/completions \\
  -H "Authorization: Bearer ${KEY_ENV}" \\
  -H "Content-Type: application/json" \\
  -d {quoted}"""
    javascript = f'''import OpenAI from "openai";

const client = new OpenAI({{ baseURL: "{base_url}", apiKey: process.env.{KEY_ENV} }});
const resp = await client.chat.completions.create({{
  model: "{model}",
  messages: [{{ role: "user", content: {msg} }}],
  max_tokens: 64,
}});
console.log(resp.choices[0].message.content);'''
    return {"python": python, "curl": curl, "javascript": javascript}
