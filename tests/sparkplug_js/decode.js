// Decodes Sparkplug B payloads with Eclipse Tahu's sparkplug-payload (an independent codec).
// stdin: a JSON array of base64 strings; stdout: a JSON array of decoded payloads.
// 64-bit integers become numbers when exact, else decimal strings.
// With the argument "encode": stdin is a JSON array of payload objects in Tahu's form
// ({timestamp, metrics: [{name, type, value}]}), stdout the base64 encodings (a host's NCMD).
"use strict";
const { get } = require("sparkplug-payload");
const Long = require("long");

const codec = get("spBv1.0");

function plain(value) {
  if (Long.isLong(value)) {
    const n = value.toNumber();
    return Number.isSafeInteger(n) ? n : value.toString();
  }
  if (Buffer.isBuffer(value) || value instanceof Uint8Array) {
    return { bytes: Buffer.from(value).toString("base64") };
  }
  if (Array.isArray(value)) return value.map(plain);
  if (value !== null && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = plain(v);
    return out;
  }
  return value;
}

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const payloads = JSON.parse(input);
  if (process.argv[2] === "encode") {
    const encoded = payloads.map((p) => Buffer.from(codec.encodePayload(p)).toString("base64"));
    process.stdout.write(JSON.stringify(encoded));
    return;
  }
  const decoded = payloads.map((b64) => plain(codec.decodePayload(Buffer.from(b64, "base64"))));
  process.stdout.write(JSON.stringify(decoded));
});
