import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { CONFIG_VARIABLES, loadConfig } from '../src/config/env.js';
import { REPO_ROOT } from './helpers/process.js';

const example = readFileSync(path.join(REPO_ROOT, '.env.example'), 'utf8');
const readme = readFileSync(path.join(REPO_ROOT, 'README.md'), 'utf8');
// Listed as `NAME=value`, or commented out as `# NAME=value` (the test-only ones).
const listed = new Map(
  [...example.matchAll(/^(?:# )?([A-Z][A-Z0-9_]*)=(.*)$/gm)].map((m) => [m[1]!, m[2]!] as const),
);

describe('.env.example and the README', () => {
  it('list every variable the server reads', () => {
    const missing = CONFIG_VARIABLES.filter((v) => !listed.has(v));
    expect(missing).toEqual([]);
    const undocumented = CONFIG_VARIABLES.filter((v) => !readme.includes(`\`${v}\``));
    expect(undocumented).toEqual([]);
  });

  it('list no variable the server does not read (besides the test ones)', () => {
    const extra = [...listed.keys()].filter((v) => !CONFIG_VARIABLES.includes(v) && !v.startsWith('TEST_'));
    expect(extra).toEqual([]);
  });

  it('give the defaults: loading the file as it is gives the same config as an empty environment', () => {
    const fromExample = Object.fromEntries([...listed].filter(([k]) => !k.startsWith('TEST_')));
    expect(loadConfig(fromExample, { isTty: false })).toEqual(loadConfig({}, { isTty: false }));
  });
});
