"""``edgeroute token new PRINCIPAL``: a fresh bearer token and its token-file line.

    edgeroute token new alice | { read -r token; read -r line; echo "$token" > alice.token; echo "$line" >> tokens.tsv; }

The first line of stdout is the token: give it to the device (``--token-file``
or ``EDGEROUTE_TOKEN``).  The second line is what to append to the server's
``--auth-tokens`` file: ``PRINCIPAL<TAB>sha256-hex``, never the token itself.
Then send the server SIGHUP to load it.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("token", help="make bearer tokens for `serve --auth-tokens`",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    new = sub.add_parser("new", help="print a new token, then the line for the token file",
                         description=__doc__.split("\n\n")[0])
    new.add_argument("principal", help="who the token is for (letters, digits and ._@:/=+-)")
    new.set_defaults(func=run_new)
    return p


def run_new(args: argparse.Namespace) -> int:
    from edge_service.auth import check_principal, hash_token, new_token

    try:
        principal = check_principal(args.principal)
    except ValueError as exc:
        print(f"edgeroute token new: {exc}", file=sys.stderr)
        return 2
    token = new_token()
    print(token)
    print(f"{principal}\t{hash_token(token)}")
    return 0
