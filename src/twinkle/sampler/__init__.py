"""Samplers: generation engines for RL rollouts (``Sampler.sample(inputs, sampling_params)``)."""
from twinkle.sampler.base import Sampler
from twinkle.sampler.torch_sampler import TorchSampler
from twinkle.sampler.types import SampledSequence, SampleResult, SamplingParams, to_train_samples, to_trajectories
from twinkle.sampler.vllm_sampler import VLLMSampler

__all__ = ['Sampler', 'TorchSampler', 'VLLMSampler', 'SamplingParams', 'SampleResult', 'SampledSequence',
           'to_train_samples', 'to_trajectories']
