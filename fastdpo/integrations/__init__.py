"""Layer 7, integrations: fastdpo inside other trainers (``fastdpo.integrations.trl``). Imports ``fastdpo.ops`` and
``fastdpo.models``, and the other trainer's package when it is used."""
