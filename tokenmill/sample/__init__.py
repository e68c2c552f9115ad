from tokenmill.sample.sampler import Sampler, SamplerOutput, SamplingMetadata

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata"]
