// JupyterLab's packages ship ES modules; Jest runs CommonJS, so Babel converts them.
module.exports = require('@jupyterlab/testutils/lib/babel.config');
