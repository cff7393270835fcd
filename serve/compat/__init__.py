"""The official ACE-Step server's dialects: ``/release_task`` bodies → library params and
``/query_result`` records (``release``), the service routes' shapes and examples (``official``),
``/v1/chat/completions`` (``chat``), and the route group the ingress inherits (``routes``)."""
