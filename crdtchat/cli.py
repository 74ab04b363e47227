"""`crdtchat` command line (design §6).

Only argument parsing lives here; each command's work is in the module that owns it, imported
lazily so that `crdtchat token` does not load the relay or a model.
Exit status: 0 success, 2 bad usage, 1 failure with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from crdtchat.errors import CommandError

RELAYS_HELP = "ws://HOST:PORT, or several comma-separated: tried in turn when one goes away"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crdtchat", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the relay")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    serve.add_argument("--data", default="./crdtchat-data", help="directory of the SQLite store")
    serve.add_argument(
        "--max-frame", type=int, default=8 * 1024 * 1024, help="largest accepted frame, bytes"
    )
    from crdtchat.relay.options import add_extra_options

    add_extra_options(serve)

    token = commands.add_parser(
        "token", help="print a signed token (without --room: an identity token)"
    )
    token.add_argument("--sub", required=True, help="the person or worker it is issued to")
    token.add_argument("--room", default=None, help="a room name, or * for every room")
    token.add_argument("--role", default=None, choices=["reader", "writer", "worker"])
    token.add_argument("--ttl", type=float, default=30 * 24 * 3600, help="seconds until expiry")
    token.add_argument(
        "--link", default=None, metavar="URL", help="print URL#token=<token>, to sign in a device"
    )
    token.add_argument(
        "--qr", action="store_true", help="also draw it as a QR code, for a phone's camera"
    )

    worker = commands.add_parser("worker", help="run the LLM worker peer")
    worker.add_argument("--relay", required=True, help=RELAYS_HELP)
    worker.add_argument(
        "--provider", default="local", choices=["local", "openai", "openai-chat", "anthropic"]
    )
    worker.add_argument("--model", default=None)
    worker.add_argument(
        "--lease-ttl", type=float, default=30.0, help="seconds a turn's lease lasts unrenewed"
    )
    worker.add_argument(
        "--idle-after", type=float, default=30.0, help="close a room after this long without work"
    )

    chat = commands.add_parser("chat", help="the terminal chat client")
    chat.add_argument("room", nargs="?", help="without it: your conversation list")
    chat.add_argument("--relay", default="ws://127.0.0.1:8765", help=RELAYS_HELP)
    chat.add_argument("--device", default=None, help="this device's name (default: hostname)")

    commands.add_parser("demo", help="relay, local worker and a chat in one command")
    from crdtchat.membership import add_commands

    add_commands(commands)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from crdtchat.relay.main import serve_command

        return serve_command(args)
    if args.command == "token":
        from crdtchat.tokens import token_command

        return token_command(args)
    if args.command == "worker":
        from crdtchat.worker.main import worker_command

        return worker_command(args)
    if args.command == "chat":
        from crdtchat.tui.main import chat_command

        return chat_command(args)
    if args.command == "demo":
        from crdtchat.demo import demo_command

        return demo_command(args)
    if args.command in ("share", "invite", "join"):
        from crdtchat import membership

        command = getattr(membership, f"{args.command}_command")
        return int(command(args))
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on bad usage
    try:
        return run(args)
    except CommandError as error:
        print(f"crdtchat {args.command}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    from crdtchat.cli import main as installed_main  # one module object, one CommandError

    sys.exit(installed_main())
