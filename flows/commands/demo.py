"""`llmhost demo`: build the demo model, serve it with vLLM, answer through the OpenAI SDK."""

from __future__ import annotations

import time

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo-serve")
    def demo_serve(
        serve: bool = typer.Option(False, "--serve", help="Keep the server up until Ctrl-C."),
        question: str = typer.Option("hi , i have a question about my invoice .", help="What to ask."),
    ) -> None:
        """Build the demo model (skipped when built), start vLLM on it, and ask it one question."""
        import openai
        from rich.console import Console

        from demo.build import build_demo_model, default_demo_dir
        from tasks.core import quiet
        from tasks.serving.base import VllmArgs
        from tasks.serving.local import LocalTarget

        console = Console()
        built = build_demo_model(default_demo_dir(), log=console.print)
        console.print(f"demo model: {built.model_dir} ({'cached' if built.skipped else f'built in {built.seconds}s'})")
        target = LocalTarget()
        t0 = time.monotonic()
        # A spinner on a terminal, a "still running" line every 30 s elsewhere: the wait is about a minute on 2 cores.
        with quiet.step("start vLLM"):
            replica = target.start(VllmArgs(model=str(built.model_dir), served_model_name="demo", dtype="float32",
                                            max_model_len=1024, enforce_eager=True), name="demo")
        try:
            console.print(f"vLLM up in {time.monotonic() - t0:.0f}s; KV cache {replica.kv_cache_tokens} tokens; "
                          f"log {replica.log_path}")
            client = openai.OpenAI(base_url=replica.base_url, api_key="unused", max_retries=0)
            resp = client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": question}], max_tokens=32, temperature=0)
            console.print(f"[bold]Q:[/bold] {question}\n[bold]A:[/bold] {resp.choices[0].message.content}")
            usage = resp.usage
            tokens = f"tokens in/out {usage.prompt_tokens}/{usage.completion_tokens}" if usage else "no usage"
            console.print(f"base URL: {replica.base_url}  model: demo  ({tokens})")
            if serve:
                console.print("serving; Ctrl-C to stop")
                while True:
                    time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            target.stop(replica)
