#!/usr/bin/env node
/**
 * Type-checks Grafana dashboard JSON files against @grafana/schema's Dashboard type.
 *
 *   node check-dashboards.mjs                 # every grafana/dashboards/*.json
 *   node check-dashboards.mjs a.json b.json   # just these
 *
 * No Grafana server is needed: each dashboard is pasted verbatim into a generated
 * `const dashboard: CheckedDashboard = <json>;` module and the TypeScript compiler checks it
 * (unknown keys, wrong types and misspelt enum values are errors). Diagnostics are reported
 * against the JSON file and its own line numbers. Exit status: 0 clean, 1 type errors,
 * 2 unreadable input.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const here = path.dirname(fileURLToPath(import.meta.url));
const HEADER = "import type { CheckedDashboard } from '../../src/dashboard';\n" +
  'export const dashboard: CheckedDashboard =\n';

function dashboardPaths(args) {
  if (args.length > 0) return args.map((p) => path.resolve(p));
  const dir = path.resolve(here, '..', 'dashboards');
  return fs.readdirSync(dir).filter((f) => f.endsWith('.json')).sort()
    .map((f) => path.join(dir, f));
}

function compilerOptions() {
  const configPath = path.join(here, 'tsconfig.json');
  const { config, error } = ts.readConfigFile(configPath, ts.sys.readFile);
  if (error) throw new Error(ts.flattenDiagnosticMessageText(error.messageText, '\n'));
  return ts.parseJsonConfigFileContent(config, ts.sys, here).options;
}

/** Writes one module per dashboard; returns a map from module path to JSON path. */
function generate(jsonPaths, buildDir) {
  const modules = new Map();
  jsonPaths.forEach((jsonPath, index) => {
    const text = fs.readFileSync(jsonPath, 'utf8');
    JSON.parse(text); // a syntax error is reported as such, not as a type error
    const modulePath = path.join(buildDir, `dashboard_${index}.ts`);
    fs.writeFileSync(modulePath, `${HEADER}${text.trimEnd()};\n`);
    modules.set(path.resolve(modulePath), jsonPath);
  });
  return modules;
}

function report(diagnostics, modules) {
  const headerLines = HEADER.split('\n').length - 1;
  for (const d of diagnostics) {
    const message = ts.flattenDiagnosticMessageText(d.messageText, '\n  ');
    const file = d.file && modules.get(path.resolve(d.file.fileName));
    if (d.file && d.start !== undefined) {
      const { line, character } = d.file.getLineAndCharacterOfPosition(d.start);
      const where = file
        ? `${path.relative(process.cwd(), file)}:${line + 1 - headerLines}:${character + 1}`
        : `${d.file.fileName}:${line + 1}:${character + 1}`;
      console.error(`${where}: error TS${d.code}: ${message}`);
    } else {
      console.error(`error TS${d.code}: ${message}`);
    }
  }
}

function main() {
  let jsonPaths;
  const buildRoot = path.join(here, 'build');
  fs.mkdirSync(buildRoot, { recursive: true });
  const buildDir = fs.mkdtempSync(path.join(buildRoot, 'run-'));
  try {
    jsonPaths = dashboardPaths(process.argv.slice(2));
    if (jsonPaths.length === 0) throw new Error('no dashboard JSON files found');
    const modules = generate(jsonPaths, buildDir);
    const program = ts.createProgram({
      rootNames: [...modules.keys(), path.join(here, 'src', 'dashboard.ts')],
      options: compilerOptions(),
    });
    const diagnostics = ts.getPreEmitDiagnostics(program);
    report(diagnostics, modules);
    const errors = diagnostics.filter((d) => d.category === ts.DiagnosticCategory.Error);
    const status = errors.length > 0 ? 'FAILED' : 'ok';
    console.log(`${status}: ${jsonPaths.length} dashboard(s), ${errors.length} type error(s)`);
    return errors.length > 0 ? 1 : 0;
  } catch (err) {
    console.error(`error: ${err.message}`);
    return 2;
  } finally {
    fs.rmSync(buildDir, { recursive: true, force: true });
  }
}

process.exitCode = main();
