"""The ``twinkle`` command.

``twinkle serve --model builtin://tiny-qwen3 --host 127.0.0.1 --port 8000 --data-dir DIR --api-key KEY``
starts the multi-tenant training server (options may also come from ``--config server.yaml``).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='twinkle', description='Twinkle: train LLMs with PyTorch.')
    sub = parser.add_subparsers(dest='command', required=True)
    serve = sub.add_parser('serve', help='run the multi-tenant training server (native and Tinker-compatible APIs)')
    serve.add_argument('--model', help='base model id (builtin://tiny-qwen3, hf://org/name, ms://org/name, folder)')
    serve.add_argument('--model-name', help='the name clients use for the base model (default: --model)')
    serve.add_argument('--model-alias', action='append', default=[], dest='model_aliases',
                       help='another name the base model answers to (repeat for several), e.g. the model names '
                            'of recipes written for other models')
    serve.add_argument('--tokenizer-id', help='tokenizer id reported to clients (a hub name they can load)')
    serve.add_argument('--host', help='address to listen on (default 127.0.0.1)')
    serve.add_argument('--port', type=int, help='port (default 8000)')
    serve.add_argument('--data-dir', help='where runs and checkpoints of every tenant are kept')
    serve.add_argument('--api-key', action='append', default=[], dest='api_keys',
                       help='an accepted API key (repeat for several tenants); also TWINKLE_SERVER_API_KEYS '
                            '(comma-separated)')
    serve.add_argument('--config', help='YAML file with the same options plus limits (validated); every option '
                                        'can also be a TWINKLE_SERVER_<NAME> environment variable')
    serve.add_argument('--max-new-tokens', type=int,
                       help='longest completion one sample may ask for (limits.max_new_tokens, default 8192)')
    serve.add_argument('--max-tokens-per-request', type=int,
                       help='tokens one request may use, prompt plus completions (limits.max_tokens_per_request)')
    serve.add_argument('--mixed-precision', choices=('auto', 'no', 'bf16', 'fp16'))
    serve.add_argument('--log-level', choices=('debug', 'info', 'warning', 'error'))
    serve.add_argument('--mesh', help='place the base model on ranks through Ray: fsdp=2 (FSDP2), tp=2 '
                                      '(tensor parallelism) or fsdp=2,tp=2 (four ranks)')
    serve.add_argument('--ray-address', help='Ray cluster to join for --mesh (default: start a local one)')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == 'serve':
        from .server.config import ConfigError, load_settings
        try:  # flags over TWINKLE_SERVER_* variables over the file: pydantic-settings merges them
            settings = load_settings(args.config, model=args.model, model_name=args.model_name,
                                     model_aliases=args.model_aliases, max_new_tokens=args.max_new_tokens,
                                     max_tokens_per_request=args.max_tokens_per_request,
                                     tokenizer_id=args.tokenizer_id, host=args.host, port=args.port,
                                     data_dir=args.data_dir, api_keys=args.api_keys,
                                     mixed_precision=args.mixed_precision, log_level=args.log_level,
                                     mesh=args.mesh, ray_address=args.ray_address)
        except ConfigError as exc:
            print(f'twinkle serve: {exc}', file=sys.stderr)
            return 2
        if not settings.api_keys:
            print('twinkle serve: give at least one --api-key (or api_keys in --config, or TWINKLE_SERVER_API_KEYS)',
                  file=sys.stderr)
            return 2
        from .server.app import serve
        serve(settings)
    return 0


if __name__ == '__main__':
    sys.exit(main())
