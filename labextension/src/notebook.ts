/** Opening the notebook that ran a job, at the cell that ran it. */

import { IDocumentManager } from '@jupyterlab/docmanager';
import { NotebookPanel } from '@jupyterlab/notebook';

/**
 * Opens (or brings forward) the notebook at `path`, a path under the server's root
 * as the contents API names it, and makes the cell whose id is `cellId` the active
 * one, scrolled into view. A cell deleted since is an error the view shows; the
 * notebook stays open.
 */
export async function openNotebookAt(
  docManager: IDocumentManager,
  path: string,
  cellId: string | null
): Promise<void> {
  const widget = docManager.openOrReveal(path);
  if (!widget) {
    throw new Error(`Could not open ${path}: JupyterLab has no viewer for it.`);
  }
  if (!cellId || !(widget instanceof NotebookPanel)) {
    return;
  }
  // Cells exist once the file is read, and can be scrolled to once the panel is shown.
  await widget.context.ready;
  await widget.revealed;
  const notebook = widget.content;
  const index = notebook.widgets.findIndex(cell => cell.model.id === cellId);
  if (index < 0) {
    throw new Error(
      `${path} is open, but its cell ${cellId} (the one that ran the job) is no longer in it.`
    );
  }
  notebook.activeCellIndex = index;
  await notebook.scrollToCell(notebook.widgets[index], 'center');
}
