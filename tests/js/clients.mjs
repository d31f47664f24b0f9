// The official JavaScript client (@kubernetes/client-node 2) against a keelson cluster: create
// without apiVersion/kind, list, merge patch, watch, exec with and without stderr and with
// stdin, logs, port-forward and deleteCollection. Run by tests/clients.rs with node's test
// runner (KUBECONFIG: a keelson lab; KT_IMAGE: its busybox; NODE_PATH: the installed client).
import test from 'node:test';
import assert from 'node:assert/strict';
import stream from 'node:stream';
import { createRequire } from 'node:module';

const require = createRequire(process.env.KT_CLIENT_DIR + '/');
const k8s = await import(require.resolve('@kubernetes/client-node'));

const NS = 'jsclient';
const kc = new k8s.KubeConfig();
kc.loadFromFile(process.env.KUBECONFIG);
const core = kc.makeApiClient(k8s.CoreV1Api);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, f, secs = 60) {
  const t0 = Date.now();
  while (Date.now() - t0 < secs * 1000) {
    const v = await f();
    if (v) return v;
    await sleep(300);
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** Collects what a stream is written. */
function sink() {
  const s = new stream.PassThrough();
  s.text = '';
  s.on('data', (d) => { s.text += d.toString(); });
  return s;
}

test.before(async () => {
  await core.createNamespace({ body: { metadata: { name: NS } } });
  await core.createNamespacedPod({
    namespace: NS,
    body: {
      metadata: { name: 'box' },
      spec: {
        terminationGracePeriodSeconds: 1,
        containers: [{
          name: 'main',
          image: process.env.KT_IMAGE,
          command: ['sh', '-c', 'echo started-box; mkdir -p /www && echo js-hello > /www/index.html && httpd -p 8080 -h /www && exec sleep 3600'],
          readinessProbe: { tcpSocket: { port: 8080 }, periodSeconds: 1 },
        }],
      },
    },
  });
  await until('the box pod ready', async () => {
    const p = await core.readNamespacedPod({ name: 'box', namespace: NS });
    return (p.status?.conditions ?? []).some((c) => c.type === 'Ready' && c.status === 'True');
  }, 90);
});

test('create without apiVersion/kind, list, merge patch', async () => {
  const cm = await core.createNamespacedConfigMap({
    namespace: NS, body: { metadata: { name: 'plain', labels: { batch: 'x' } }, data: { a: '1' } },
  });
  assert.equal(cm.kind, 'ConfigMap');
  const list = await core.listNamespacedConfigMap({ namespace: NS, labelSelector: 'batch=x' });
  assert.deepEqual(list.items.map((c) => c.metadata.name), ['plain']);
  await core.patchNamespacedConfigMap(
    { name: 'plain', namespace: NS, body: { data: { b: '2' } } },
    k8s.setHeaderOptions('Content-Type', k8s.PatchStrategy.MergePatch),
  );
  const got = await core.readNamespacedConfigMap({ name: 'plain', namespace: NS });
  assert.deepEqual(got.data, { a: '1', b: '2' });
});

test('watch from a resourceVersion', async () => {
  const rv = (await core.listNamespacedConfigMap({ namespace: NS })).metadata.resourceVersion;
  const seen = [];
  const w = new k8s.Watch(kc);
  const req = await w.watch(`/api/v1/namespaces/${NS}/configmaps`, { resourceVersion: rv },
    (type, obj) => seen.push(`${type} ${obj.metadata.name}`), () => {});
  await core.createNamespacedConfigMap({ namespace: NS, body: { metadata: { name: 'watched' } } });
  await until('the ADDED event', () => seen.includes('ADDED watched'), 20);
  req.abort();
});

test('exec with and without stderr, and with stdin', async () => {
  const exec = new k8s.Exec(kc);
  const run = (cmd, out, err, input, tty = false) => new Promise((resolve, reject) => {
    exec.exec(NS, 'box', 'main', cmd, out, err, input, tty, (st) => resolve(st)).catch(reject);
  });
  let out = sink();
  let err = sink();
  let st = await run(['sh', '-c', 'echo to-out; echo to-err >&2'], out, err, null);
  assert.equal(st.status, 'Success');
  assert.equal(out.text, 'to-out\n');
  assert.equal(err.text, 'to-err\n');
  out = sink();
  st = await run(['sh', '-c', 'echo only-out; echo dropped >&2; exit 4'], out, null, null);
  assert.equal(out.text, 'only-out\n');
  assert.equal(st.status, 'Failure');
  assert.equal(st.reason, 'NonZeroExitCode');
  out = sink();
  const input = new stream.PassThrough();
  const done = run(['sh', '-c', 'read line; echo got-$line'], out, null, input);
  input.end('js-stdin\n');
  st = await done;
  assert.equal(out.text, 'got-js-stdin\n');
});

test('logs', async () => {
  const out = sink();
  await new k8s.Log(kc).log(NS, 'box', 'main', out, { follow: false });
  await until('the log to arrive', () => out.text.includes('started-box'), 10);
});

test('port-forward', async () => {
  const pf = new k8s.PortForward(kc);
  const out = sink();
  const err = sink();
  const input = new stream.PassThrough();
  const ws = await pf.portForward(NS, 'box', [8080], out, err, input);
  input.write('GET /index.html HTTP/1.0\r\n\r\n');
  await until('the page through the tunnel', () => out.text.includes('js-hello'), 20);
  assert.equal(err.text, '');
  ws.close();
});

test('deleteCollection', async () => {
  for (const n of ['d1', 'd2', 'd3']) {
    await core.createNamespacedConfigMap({ namespace: NS, body: { metadata: { name: n, labels: { gone: 'yes' } } } });
  }
  await core.deleteCollectionNamespacedConfigMap({ namespace: NS, labelSelector: 'gone=yes' });
  const left = await core.listNamespacedConfigMap({ namespace: NS, labelSelector: 'gone' });
  assert.equal(left.items.length, 0);
});
