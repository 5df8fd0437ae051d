"""The one declaration of what a remote Twinkle object can do over HTTP.

The server's native routes and the client's proxy classes are both built from these tables, so the
two cannot drift: the server refuses a method that is not declared here, and the client has no
method that is not declared here. ``tests/client/test_methods.py`` checks that ``MODEL`` covers every
``@remote_function`` of ``TransformersModel`` and every method of ``TwinkleModel``.

This module must stay importable without torch or transformers (thin clients read it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

API_PREFIX = '/api/v1/twinkle'

# How a call's result comes back:
#   'value' - encoded (JSON, tensors as tagged arrays);
#   'ref'   - the object stays on the server, the client gets a handle it can pass back;
#   'self'  - the call returns the object it was made on (chaining, e.g. dataset.map(...).encode());
#   'none'  - nothing.
RETURNS = ('value', 'ref', 'self', 'none')
# Where the server runs a call: 'model' - the single worker that owns the shared model (fair queue
# across tenants); 'data' - a thread pool (data preparation never waits behind training steps).
EXECUTORS = ('model', 'data')


@dataclass(frozen=True)
class Method:
    name: str
    returns: str = 'value'
    doc: str = ''

    def __post_init__(self) -> None:
        if self.returns not in RETURNS:
            raise ValueError(f'Method {self.name}: returns={self.returns!r} must be one of {RETURNS}')


@dataclass(frozen=True)
class RemoteClass:
    name: str
    executor: str
    methods: Dict[str, Method] = field(default_factory=dict)
    doc: str = ''

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f'RemoteClass {self.name}: executor={self.executor!r} must be one of {EXECUTORS}')


def _table(*methods: Method) -> Dict[str, Method]:
    return {m.name: m for m in methods}


MODEL = RemoteClass('TransformersModel', 'model', _table(
    Method('forward', 'ref', 'forward pass with gradients; the outputs stay on the server (pass them to '
                             'calculate_loss)'),
    Method('forward_only', 'value', 'forward without gradients; returns loss, num_items, metrics and logps'),
    Method('calculate_loss', 'ref', 'the adapter loss applied to the outputs of forward'),
    Method('backward', 'none', 'backward of a loss returned by calculate_loss'),
    Method('forward_backward', 'value', 'forward + loss + backward; returns loss and metrics'),
    Method('clip_grad_norm', 'value'),
    Method('step', 'none'),
    Method('zero_grad', 'none'),
    Method('lr_step', 'none'),
    Method('clip_grad_and_step', 'value'),
    Method('set_loss', 'none', 'a registered loss name (e.g. CrossEntropyLoss) and its keyword arguments'),
    Method('set_optimizer', 'none', 'a registered optimizer name (e.g. AdamW) and its keyword arguments'),
    Method('set_lr_scheduler', 'none', 'a registered scheduler name and its keyword arguments'),
    Method('add_metric', 'none'),
    Method('calculate_metric', 'value'),
    Method('add_adapter_to_model', 'none', 'a LoRA config (or a twinkle:// checkpoint path) for a new adapter'),
    Method('remove_adapter', 'none'),
    Method('set_template', 'none', 'the template used for trajectories sent by this client (not shared)'),
    Method('set_processor', 'none', 'the input processor used for this client (not shared)'),
    Method('apply_patch', 'none', 'refused: patches change the shared base model'),
    Method('save', 'value', 'returns the twinkle:// path of the checkpoint'),
    Method('load', 'none', 'weights of a twinkle:// checkpoint into an adapter'),
    Method('resume_from_checkpoint', 'value'),
    Method('get_state_dict', 'value', 'the adapter weights (tensors)'),
    Method('get_train_configs', 'value'),
    Method('generate', 'value'),
), doc='One client view of the shared base model; each adapter added through it is a training run.')

DATASET = RemoteClass('Dataset', 'data', _table(
    Method('map', 'self'),
    Method('filter', 'self'),
    Method('set_template', 'self'),
    Method('encode', 'self'),
    Method('pack', 'self'),
    Method('__len__', 'value'),
    Method('__getitem__', 'value'),
    Method('column_names', 'value'),
    Method('stats', 'value'),
    Method('add_dataset', 'self', 'one more hub source (a DatasetMeta); mix_dataset() mixes the sources'),
    Method('mix_dataset', 'self', 'interleave (or concatenate) the sources given to add_dataset'),
    Method('save_as', 'self', 'refused: the server writes no files for clients (read the rows with dataset[i])'),
    Method('flush_save', 'none', 'refused, as save_as'),
), doc='A dataset loaded and prepared on the server (hub ids only, never server paths).')

DATALOADER = RemoteClass('DataLoader', 'data', _table(
    Method('__len__', 'value'),
    Method('__iter__', 'ref'),
    Method('set_epoch', 'none'),
    Method('get_state', 'value'),
    Method('resume_from_checkpoint', 'none'),
    Method('skip_consumed_samples', 'none', 'skip the first n global samples (as resume_from_checkpoint)'),
    Method('set_processor', 'self', 'a registered input processor name (e.g. InputProcessor) and its arguments'),
), doc='Batches of a server-side Dataset; iterating yields the encoded samples.')

ITERATOR = RemoteClass('BatchIterator', 'data', _table(
    Method('__next__', 'value'),
), doc='One pass over a DataLoader.')

CLASSES: Dict[str, RemoteClass] = {c.name: c for c in (MODEL, DATASET, DATALOADER, ITERATOR)}
# Classes a client may construct directly (BatchIterator only comes from DataLoader.__iter__).
CONSTRUCTIBLE: Tuple[str, ...] = ('TransformersModel', 'Dataset', 'DataLoader')

# Wire tags of the value codec (twinkle.wire.codec).
TAG_ARRAY = '__ndarray__'
TAG_REF = '__ref__'
TAG_LORA = '__lora__'
TAG_DATASET_META = '__dataset_meta__'
TAG_COMPONENT = '__component__'
TAG_RANGE = '__range__'
TAG_SLICE = '__slice__'
TAG_TUPLE = '__tuple__'
