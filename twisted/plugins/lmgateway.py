from twisted.application.service import ServiceMaker

lmgateway = ServiceMaker(
    "lmarena-gateway",
    "lmarena_gateway.tap",
    "OpenAI-compatible gateway with named sessions in front of LMArenaBridge",
    "lmgateway",
)
