// A Node service that follows one room: each change once, in commit order,
// across reconnects and gateway restarts. test/examples.test.js runs it.
//   GATEWAY_URL=ws://127.0.0.1:8080/ws GATEWAY_TOKEN=<jwt> node examples/node.mjs project:42
import WebSocket from "ws";
import { GatewayClient } from "ws-gateway-client";

const client = new GatewayClient(process.env.GATEWAY_URL ?? "ws://127.0.0.1:8080/ws", {
  token: async () => process.env.GATEWAY_TOKEN, // or fetch a fresh JWT from your auth service
  WebSocket, // Node 20 has no global WebSocket: the ws package's
});
client.on("state", ({ state, code, reason }) => console.error(`[${state}]`, code ?? "", reason ?? ""));
client.subscribe(process.argv[2] ?? "project:42", {
  onChange: (change) => console.log(JSON.stringify({ position: change.position, op: change.op, key: change.key })),
  onReset: ({ reason }) => console.error(`history is gone (${reason}): refetch the room's state`),
  onError: ({ code, message }) => console.error(`refused: ${code}: ${message}`),
});
// After close() nothing is left running: the process exits by itself.
process.once("SIGINT", () => client.close());
process.once("SIGTERM", () => client.close());
