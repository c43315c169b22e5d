"""The Open Inference Protocol's gRPC messages (inference.proto), loaded into a descriptor pool of the
service's own (generate.py says why), as message classes: `messages.ModelInferRequest` etc."""

from __future__ import annotations

from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from service.protocol.descriptor import DESCRIPTOR

SERVICE = "inference.GRPCInferenceService"
_pool = descriptor_pool.DescriptorPool()
_pool.Add(descriptor_pb2.FileDescriptorProto.FromString(DESCRIPTOR))
_file = _pool.FindFileByName("inference.proto")

messages = SimpleNamespace(**{name: message_factory.GetMessageClass(kind)
                              for name, kind in _file.message_types_by_name.items()})
# the RPCs: name -> (request class, response class)
methods = {m.name: (getattr(messages, m.input_type.name), getattr(messages, m.output_type.name))
           for m in _file.services_by_name["GRPCInferenceService"].methods}
