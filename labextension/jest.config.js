// JupyterLab's Jest setup (jsdom with fetch, ts-jest), as the extension template uses it.
const jestJupyterLab = require('@jupyterlab/testutils/lib/jest-config');

// Packages published as ES modules, which Babel must transform for Jest: those
// JupyterLab's own configuration lists, and JupyterLab's packages themselves, which
// the configuration written for JupyterLab's source tree does not need to list.
const esModules = [
  '@codemirror',
  '@jupyter/react-components',
  '@jupyter/web-components',
  '@jupyter/ydoc',
  '@jupyterlab/',
  '@marijn',
  '@microsoft',
  'color',
  'exenv-es6',
  'lib0',
  'marked',
  'nanoid',
  'vscode-ws-jsonrpc',
  'y-protocols',
  'y-websocket',
  'yjs'
].join('|');

module.exports = {
  ...jestJupyterLab(__dirname),
  automock: false,
  // No JUnit files or GitHub annotations: the terminal report is what is read.
  reporters: ['default'],
  testRegex: 'src/__tests__/.*\\.spec\\.ts$',
  transformIgnorePatterns: [`/node_modules/(?!${esModules}).+`]
};
