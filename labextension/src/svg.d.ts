// The builder and the tests load SVG files as their text (asset/source), for LabIcon.
declare module '*.svg' {
  const svgstr: string;
  export default svgstr;
}
