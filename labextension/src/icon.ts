import { LabIcon } from '@jupyterlab/ui-components';

import svg from '../style/icons/tfos.svg';

/** The sidebar's tab icon: a falling loss curve, themed like JupyterLab's own icons. */
export const tfosIcon = new LabIcon({ name: 'tfos-magic:jobs', svgstr: svg });
