/**
 * The tfos-magic sidebar for JupyterLab 4: the jobs of the tfos job store in the left
 * area, and each job's detail in the main area. Both read the tfos server extension's
 * REST API (`<base_url>/tfos/api/`).
 */

import {
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget, WidgetTracker } from '@jupyterlab/apputils';
import { IDocumentManager } from '@jupyterlab/docmanager';

import { TfosClient } from './api';
import { JobDetailView } from './detail';
import { tfosIcon } from './icon';
import { openNotebookAt } from './notebook';
import { JobsPanel } from './panel';

namespace CommandIDs {
  export const openJob = 'tfos-magic:open-job';
  export const showJobs = 'tfos-magic:show-jobs';
}

const PANEL_ID = 'tfos-magic-jobs';

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'tfos-magic:sidebar',
  description:
    'Lists the tfos jobs in the left sidebar, with progress, loss and checkpoints, and stops them.',
  autoStart: true,
  requires: [IDocumentManager],
  optional: [ILayoutRestorer, ICommandPalette],
  activate: (
    app: JupyterFrontEnd,
    docManager: IDocumentManager,
    restorer: ILayoutRestorer | null,
    palette: ICommandPalette | null
  ): void => {
    const client = new TfosClient(app.serviceManager.serverSettings);
    const tracker = new WidgetTracker<MainAreaWidget<JobDetailView>>({
      namespace: 'tfos-magic-job'
    });

    app.commands.addCommand(CommandIDs.openJob, {
      label: args => (args.name ? `tfos job ${String(args.name)}` : 'Open a tfos job'),
      caption: 'Show a tfos job: its loss, checkpoints, options and error',
      icon: tfosIcon,
      execute: args => {
        const name = String(args.name ?? '');
        if (!name) {
          return;
        }
        const open = tracker.find(widget => widget.content.jobName === name);
        if (open) {
          app.shell.activateById(open.id);
          return open;
        }
        const content = new JobDetailView({
          client,
          name,
          openNotebook: (path, cellId) => openNotebookAt(docManager, path, cellId)
        });
        const widget = new MainAreaWidget({ content });
        // One tab per job: the id is also what the layout restorer keys it by.
        widget.id = `tfos-magic-job-${name}`;
        widget.title.icon = tfosIcon;
        widget.title.closable = true;
        void tracker.add(widget);
        app.shell.add(widget, 'main');
        app.shell.activateById(widget.id);
        return widget;
      }
    });

    const panel = new JobsPanel({
      client,
      open: name => void app.commands.execute(CommandIDs.openJob, { name })
    });
    panel.id = PANEL_ID;
    panel.title.icon = tfosIcon;
    app.shell.add(panel, 'left', { rank: 600 });

    app.commands.addCommand(CommandIDs.showJobs, {
      label: 'Show tfos Jobs',
      caption: 'Show the tfos jobs sidebar',
      execute: () => app.shell.activateById(PANEL_ID)
    });
    palette?.addItem({ command: CommandIDs.showJobs, category: 'tfos' });

    if (restorer) {
      // The sidebar comes back open if it was, and so do the jobs' tabs.
      restorer.add(panel, PANEL_ID);
      void restorer.restore(tracker, {
        command: CommandIDs.openJob,
        args: widget => ({ name: widget.content.jobName }),
        name: widget => widget.content.jobName
      });
    }
  }
};

export default plugin;
