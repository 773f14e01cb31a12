"""A gRPC server and client on grpcio, for the http probe's tests. No generated code: generic
handlers on raw bytes. Run with Debian's python3-grpcio (/usr/bin/python3), which uses the
system's OpenSSL, so its TLS goes through libssl (the pip wheel links BoringSSL statically).

  server PORT [CERT KEY]   serves shop.Cart/Add (OK) and shop.Cart/Fail (NOT_FOUND)
  client PORT [CERT] METHOD...   calls the methods in order on one channel, then exits
"""

import sys
from concurrent.futures import ThreadPoolExecutor

import grpc


def add(request, context):
    return b"added"


def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "no such cart")


def serve(port, cert=None, key=None):
    handler = grpc.method_handlers_generic_handler(
        "shop.Cart",
        {
            "Add": grpc.unary_unary_rpc_method_handler(add),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
        },
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    address = f"127.0.0.1:{port}"
    if cert:
        with open(cert, "rb") as c, open(key, "rb") as k:
            credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    server.start()
    server.wait_for_termination()


def call(port, cert, methods):
    address = f"127.0.0.1:{port}"
    if cert:
        with open(cert, "rb") as c:
            credentials = grpc.ssl_channel_credentials(root_certificates=c.read())
        channel = grpc.secure_channel(address, credentials)
    else:
        channel = grpc.insecure_channel(address)
    for method in methods:
        try:
            channel.unary_unary(f"/shop.Cart/{method}")(b"item", timeout=10)
        except grpc.RpcError as e:
            print(method, e.code(), file=sys.stderr)
    channel.close()


if __name__ == "__main__":
    role, port, rest = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if role == "server":
        serve(port, *rest)
    else:
        cert = rest.pop(0) if rest and rest[0].endswith(".pem") else None
        call(port, cert, rest)
